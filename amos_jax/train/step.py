"""The pure train and eval steps: `step(state, batch) -> (state, metrics)`."""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from amos_jax.errors import ConfigError
from amos_jax.model import rng as rng_lib
from amos_jax.model.partitioning import constrain
from amos_jax.train import sharding as shd
from amos_jax.train.layer_groups import ungroup
from amos_jax.train.state import (TrainState, apply_learning_rate, create_train_state_and_form,
                                  learning_rate_schedule, make_optimizer)

log = logging.getLogger("amos_jax")


def step_rng(seed: int, step, impl: str = "threefry") -> jax.Array:
  """Masks, samples and dropout of a step are a function of (seed, step) alone.

  impl (`train.rng_impl`): the bit generator. 'threefry' (JAX's default) is the
  costliest on CPU; 'rbg' and 'unsafe_rbg' draw bits with XLA's RngBitGenerator
  (as t5x does), cheaper to run and to compile. Each is a pure function of its key,
  so resume and per-row determinism hold for all three; they draw different
  streams, so the choice is part of a run's config.
  """
  return jax.random.fold_in(jax.random.key(seed, impl=_PRNG_IMPLS[impl]), step)


_PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def split_micro_batches(batch: dict, num: int, rows: jax.Array):
  """(B, ...) -> (num, B / num, ...); micro-batch j holds rows j, j + num, ...

  Strided rows keep every micro-batch spread over all data shards (each device
  slices its own rows, no communication). `rows` (B,), the batch's global row
  indices, are split the same way and returned too.
  """
  b = next(iter(batch.values())).shape[0]

  def split(x):
    x = x.reshape((b // num, num) + x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  return {k: split(v) for k, v in batch.items()}, split(rows)


def reduces_once(config, mesh, param_shardings) -> bool:
  """Whether the step all-reduces its data-parallel gradients once, as one flat array
  (`sharding.grad_allreduce`), instead of where the partitioner puts the reductions.

  The partitioner reduces each layer's gradients inside the layer scan's backward
  loop, one collective per layer and encoder, each over a tuple of arrays. On
  accelerators those overlap the backward pass. Between CPU processes (gloo over
  TCP) each array pays about a millisecond of latency: the ELECTRA-small step over
  two processes spent 1.7 s of 5.3 s in them (BENCHMARKS.md). 'auto' reduces once
  there. Reducing once needs every parameter replicated (no fsdp or tensor split).
  """
  mode = config.sharding.get("grad_allreduce", "auto")
  replicated = all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings))
  if mode == "once" and not replicated:
    raise ConfigError(
        f"sharding.grad_allreduce=once needs replicated parameters, but the mesh "
        f"{dict(mesh.shape)} splits them; set mesh.fsdp=1 and mesh.tensor=1, or "
        "grad_allreduce=auto")
  if mode == "per_layer" or mesh.size == 1:
    return False
  if mode == "once":
    return True
  return (replicated and jax.process_count() > 1
          and mesh.devices.flat[0].platform == "cpu")


def make_train_step(graphdef, objective, tx, reduce_once_on=None):
  """Builds `train_step(state, batch) -> (state, metrics)`; jit it with shardings.

  reduce_once_on: a mesh (parameters replicated on it) over which each device
  computes the gradient of its rows and one psum of all gradients and metrics,
  flattened into one array, adds them up (`reduces_once`); None: the partitioner
  places the reductions. Both give the same sums up to the order of addition.

  With `train.grad_accum_steps` = A > 1 the batch is split into A micro-batches
  whose gradients are summed in a scan. Each row draws its masks, samples and
  dropout from its own key (the step key folded with the global row index), and
  every loss divides by whole-batch counts (`objective.loss_counts`, computed once
  on the full batch), so A micro-batches give the gradient and metrics of one step
  on the whole batch.

  One clock: `state.step` keys the randomness and sets the learning rate. A step
  whose gradients or updates are not finite changes neither the parameters nor
  Adam's moments, but still advances `state.step`: the next step sees the next
  batch, keys and learning rate, and the logged `learning_rate` is the one the
  schedule gives at that step.
  """
  t = objective.config.train
  schedule = learning_rate_schedule(t)
  seed, impl = t.seed, t.get("rng_impl", "threefry")
  accum = max(1, int(t.grad_accum_steps))

  def loss_fn(params, batch, counts, rng):
    # The per-layer view of the stacked arrays: XLA folds it into the layer scan.
    model = nnx.merge(graphdef, ungroup(params))
    return objective.loss(model, batch, counts, rng, True)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def local_gradients(params, batch, counts, key, rows):
    """(gradients, metrics) of the rows `batch` holds; rows: their global indices."""
    def one(mb, mb_rows):
      (_, metrics), grads = grad_fn(params, mb, counts, rng_lib.per_row(key, mb_rows))
      return grads, metrics

    if accum == 1:
      return one(batch, rows)
    micro, micro_rows = split_micro_batches(batch, accum, rows)
    shapes = jax.eval_shape(one, *jax.tree.map(lambda x: x[0], (micro, micro_rows)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(lambda acc, xs: (jax.tree.map(jnp.add, acc, one(*xs)), None),
                            zeros, (micro, micro_rows))
    return total

  def reduced_once(params, batch, counts, key, rows):
    """local_gradients on each device's rows, then one all-reduce of one flat array."""
    flat, unflatten = ravel_pytree(local_gradients(params, batch, counts, key, rows))
    return unflatten(jax.lax.psum(flat, reduce_once_on.axis_names))

  def gradients(params, batch, key):
    # Whole-batch counts, computed on the global batch before any split.
    counts = objective.loss_counts(batch)
    rows = jnp.arange(next(iter(batch.values())).shape[0], dtype=jnp.int32)
    if reduce_once_on is None:
      return local_gradients(params, batch, counts, key, rows)
    # Each device's rows are its block of the batch sharding, and every loss and
    # metric divides by whole-batch counts: the psum is the whole batch's sum, as
    # micro-batches add up under gradient accumulation.
    rows_spec = shd.batch_spec(objective.config.sharding.rules)
    # Unchecked: the hand-written backward passes (model/ops.py) return a replicated
    # kernel's gradient as a per-device value, which the checked form refuses as a
    # type mismatch; the psum is what makes it replicated.
    return jax.shard_map(
        reduced_once, mesh=reduce_once_on,
        in_specs=(P(), rows_spec, P(), P(), rows_spec), out_specs=P(),
        check_vma=False)(params, batch, counts, key, rows)

  def train_step(state: TrainState, batch):
    learning_rate = schedule(state.step)
    # Parameters, gradients and moments are layer-stacked (layer_groups): the update
    # is the same arithmetic in a program that does not grow with depth.
    old_params, old_opt = state.params, state.opt_state
    grads, metrics = gradients(old_params, batch, step_rng(seed, state.step, impl))
    grad_norm = optax.tree.norm(grads)
    direction, opt_state = tx.update(grads, old_opt, old_params)
    updates = apply_learning_rate(direction, learning_rate)
    params = optax.apply_updates(old_params, updates)
    # Non-finite guard: a step whose gradients (or updates: an overflowing learning
    # rate) are not finite changes nothing but the counters.
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=learning_rate,
                   skipped=(~finite).astype(jnp.float32))
    new_state = TrainState(
        step=state.step + 1, params=keep(params, old_params),
        opt_state=keep(opt_state, old_opt),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, objective):
  """`eval_step(params, batch, index) -> metrics`, deterministic (no dropout);
  params layer-stacked, as the train state holds them."""
  seed = objective.config.train.seed
  impl = objective.config.train.get("rng_impl", "threefry")

  def eval_step(params, batch, index):
    model = nnx.merge(graphdef, ungroup(params))
    # Eval masks depend only on the eval batch index: every eval sees the same masks.
    rng = step_rng(seed + 1, index, impl)
    _, metrics = objective.loss(model, batch, objective.loss_counts(batch), rng, False)
    return metrics

  return eval_step


def jit_train_step(graphdef, objective, tx, state_shardings, batch_sharding, mesh):
  """The train step jitted with its shardings and the state donated: the one
  program the trainer runs and `--compile_only` compiles ahead of time."""
  once = reduces_once(objective.config, mesh, state_shardings.params)
  if once:
    log.info("data-parallel gradients: one flat all-reduce per step over %d devices "
             "(sharding.grad_allreduce)", mesh.size)
  return jax.jit(make_train_step(graphdef, objective, tx, mesh if once else None),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0,
                 compiler_options=shd.compiler_options(mesh))


class Trainer(NamedTuple):
  graphdef: Any
  state: Any              # TrainState (layer-stacked), sharded on the mesh
  state_shardings: Any
  batch_sharding: Any
  train_step: Callable    # jitted, state donated
  checkpoint_form: Any    # state.CheckpointForm: the per-layer form checkpoints hold


def build_trainer(objective, mesh) -> Trainer:
  """Model and optimizer born sharded on `mesh`, and the jitted train step."""
  config = objective.config
  tx = make_optimizer(config.train)
  graphdef, state, state_sh, form = create_train_state_and_form(objective, mesh, tx)
  batch_sh = shd.batch_sharding(mesh, config.sharding.rules)
  step = jit_train_step(graphdef, objective, tx, state_sh, batch_sh, mesh)
  return Trainer(graphdef, state, state_sh, batch_sh, step, form)
