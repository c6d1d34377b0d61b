"""The pure train and eval steps: `step(state, batch) -> (state, metrics)`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from amos_jax.train.state import TrainState, learning_rate_schedule


def step_rng(seed: int, step) -> jax.Array:
  """Masks, samples and dropout of a step are a function of (seed, step) alone."""
  return jax.random.fold_in(jax.random.key(seed), step)


def make_train_step(graphdef, objective, config, tx):
  """Builds `train_step(state, batch) -> (state, metrics)`; jit it with shardings."""
  schedule = learning_rate_schedule(config.train)
  seed = config.train.seed

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params)
    return objective.compute_loss(model, batch, rng, config, train=True)

  def train_step(state: TrainState, batch):
    rng = step_rng(seed, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Non-finite guard: a step whose gradients are not finite changes nothing but
    # the counters.
    finite = jnp.isfinite(grad_norm)
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
