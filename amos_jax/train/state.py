"""Train state, optimizer and model construction (born sharded)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from amos_jax.train import sharding as shd


class TrainState(struct.PyTreeNode):
  step: jax.Array             # int32 scalar: optimizer steps taken
  params: nnx.State
  opt_state: Any
  nonfinite_streak: jax.Array  # int32: consecutive steps skipped for non-finite grads


def learning_rate_schedule(t) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then linear (ELECTRA) or cosine decay."""
  peak, end = t.learning_rate, t.learning_rate * t.end_learning_rate_fraction
  warmup = optax.linear_schedule(0.0, peak, max(1, t.warmup_steps))
  decay_steps = max(1, t.steps - t.warmup_steps)
  if t.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.end_learning_rate_fraction)
  elif t.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    raise ValueError(f"train.schedule={t.schedule!r}: use 'linear' or 'cosine'")
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def param_name(path) -> str:
  """The last dict key of a pytree path: 'kernel', 'bias', 'scale', 'embedding'."""
  return str([k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1])


def _decay_mask(params):
  # No weight decay on biases and LayerNorm scales, as BERT and ELECTRA.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_name(path) not in ("bias", "scale"), params)


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW with warmup + decay and global-norm clipping."""
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=_decay_mask))


def abstract_model(objective, config):
  """(graphdef, abstract params) without allocating anything."""
  model = nnx.eval_shape(lambda: objective.build_model(config, nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def _init_and_shardings(objective, config, mesh, tx):
  """(graphdef, init fn, abstract state, state shardings); traces the model once."""
  rules = config.sharding.rules
  graphdef, abstract_params = abstract_model(objective, config)
  params_sh = shd.param_shardings(abstract_params, mesh, rules)
  seed = config.train.seed

  def init():
    model = objective.build_model(config, nnx.Rngs(seed))
    _, params = nnx.split(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      nonfinite_streak=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init)
  state_sh = TrainState(
      step=shd.replicated(mesh), params=params_sh,
      opt_state=shd.opt_state_shardings(tx, abstract.opt_state, params_sh, mesh),
      nonfinite_streak=shd.replicated(mesh))
  return graphdef, init, abstract, state_sh


def create_train_state(objective, config, mesh, tx):
  """Builds the model and optimizer state already sharded on `mesh`.

  Returns (graphdef, state, state_shardings).
  """
  graphdef, init, _, state_sh = _init_and_shardings(objective, config, mesh, tx)
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=state_sh)()
  return graphdef, state, state_sh


def abstract_train_state(objective, config, mesh, tx):
  """(graphdef, ShapeDtypeStructs with shardings, shardings): nothing allocated.

  What `--compile_only` compiles against, on devices that need not exist.
  """
  graphdef, _, abstract, state_sh = _init_and_shardings(objective, config, mesh, tx)
  return graphdef, abstract_state(state_sh, abstract), state_sh


def abstract_state(state_shardings, state):
  """ShapeDtypeStructs carrying the current shardings: the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, state_shardings)
