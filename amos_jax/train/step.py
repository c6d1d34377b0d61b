"""The pure train and eval steps: `step(state, batch) -> (state, metrics)`."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from amos_jax.model import rng as rng_lib
from amos_jax.model.partitioning import constrain
from amos_jax.train import sharding as shd
from amos_jax.train.state import (TrainState, create_train_state, learning_rate_schedule,
                                  make_optimizer)


def step_rng(seed: int, step) -> jax.Array:
  """Masks, samples and dropout of a step are a function of (seed, step) alone."""
  return jax.random.fold_in(jax.random.key(seed), step)


def split_micro_batches(batch: dict, num: int) -> dict:
  """(B, ...) -> (num, B / num, ...); micro-batch j holds rows j, j + num, ...

  Strided rows keep every micro-batch spread over all data shards (each device
  slices its own rows, no communication). Returns the global row indices too.
  """
  b = next(iter(batch.values())).shape[0]

  def split(x):
    x = x.reshape((b // num, num) + x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  return {k: split(v) for k, v in batch.items()}, split(jnp.arange(b, dtype=jnp.int32))


def make_train_step(graphdef, objective, config, tx):
  """Builds `train_step(state, batch) -> (state, metrics)`; jit it with shardings.

  With `train.grad_accum_steps` = A > 1 the batch is split into A micro-batches
  whose gradients are summed in a scan. Each row draws its masks, samples and
  dropout from its own key (the step key folded with the global row index), and
  every loss divides by whole-batch counts (`objective.loss_normalizers`), so A
  micro-batches give the gradient and metrics of one step on the whole batch.
  """
  schedule = learning_rate_schedule(config.train)
  seed = config.train.seed
  accum = max(1, int(config.train.get("grad_accum_steps", 1)))
  normalizers = getattr(objective, "loss_normalizers", None)

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params)
    return objective.compute_loss(model, batch, rng, config, train=True)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch, key):
    counts = normalizers(batch, config) if normalizers is not None else {}

    def one(mb, mb_rows):
      (_, metrics), grads = grad_fn(params, dict(mb, **counts),
                                    rng_lib.per_row(key, mb_rows))
      return grads, metrics

    if accum == 1:
      return one(batch, jnp.arange(next(iter(batch.values())).shape[0], dtype=jnp.int32))
    micro, rows = split_micro_batches(batch, accum)
    shapes = jax.eval_shape(one, *jax.tree.map(lambda x: x[0], (micro, rows)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(
        lambda acc, xs: (jax.tree.map(jnp.add, acc, one(*xs)), None), zeros, (micro, rows))
    return total

  def train_step(state: TrainState, batch):
    grads, metrics = gradients(state.params, batch, step_rng(seed, state.step))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Non-finite guard: a step whose gradients (or updates: an overflowing learning
    # rate) are not finite changes nothing but the counters.
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   skipped=(~finite).astype(jnp.float32))
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, objective, config):
  """`eval_step(params, batch, index) -> metrics`, deterministic (no dropout)."""

  def eval_step(params, batch, index):
    model = nnx.merge(graphdef, params)
    # Eval masks depend only on the eval batch index: every eval sees the same masks.
    rng = step_rng(config.train.seed + 1, index)
    _, metrics = objective.compute_loss(model, batch, rng, config, train=False)
    return metrics

  return eval_step


class Trainer(NamedTuple):
  graphdef: Any
  state: Any              # TrainState, sharded on the mesh
  state_shardings: Any
  batch_sharding: Any
  train_step: Callable    # jitted, state donated


def build_trainer(objective, config, mesh) -> Trainer:
  """Model and optimizer born sharded on `mesh`, and the jitted train step."""
  tx = make_optimizer(config.train)
  graphdef, state, state_sh = create_train_state(objective, config, mesh, tx)
  batch_sh = shd.batch_sharding(mesh)
  step = jax.jit(make_train_step(graphdef, objective, config, tx),
                 in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
  return Trainer(graphdef, state, state_sh, batch_sh, step)
