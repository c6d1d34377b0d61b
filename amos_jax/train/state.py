"""Train state, optimizer and model construction (born sharded)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from amos_jax import config as config_lib
from amos_jax.errors import ConfigError
from amos_jax.model import deferred_init
from amos_jax.model.tracing import cheap_tracer_errors
from amos_jax.train import sharding as shd
from amos_jax.train.layer_groups import (LayerStacked, group, group_opt_state,
                                         stacked_sharding, ungroup, ungroup_opt_state)


class TrainState(struct.PyTreeNode):
  """The trainer's state. `params` and the parameter-shaped parts of `opt_state`
  are layer-stacked (`layer_groups.LayerStacked`); `per_layer_state` gives the
  per-layer form that checkpoints hold and `stack_state` the inverse."""
  step: jax.Array             # int32 scalar: optimizer steps taken
  params: LayerStacked
  opt_state: Any
  nonfinite_streak: jax.Array  # int32: consecutive steps skipped for non-finite grads


def stack_state(state: TrainState) -> TrainState:
  """Per-layer parameters and moments (checkpoints, HF import) -> layer-stacked."""
  return state.replace(params=group(state.params), opt_state=group_opt_state(state.opt_state))


def per_layer_state(state: TrainState) -> TrainState:
  """Layer-stacked -> per-layer: the form checkpoints hold, names as in the model."""
  return state.replace(params=ungroup(state.params),
                       opt_state=ungroup_opt_state(state.opt_state))


def learning_rate_schedule(t) -> optax.Schedule:
  """Learning rate at train step s: linear warmup to `learning_rate`, then linear
  (ELECTRA) or cosine decay to `end_learning_rate_fraction` of it at `train.steps`.

  The train step evaluates it at `state.step`, the same clock that keys the step's
  randomness and data, so a skipped (non-finite) step moves the schedule on exactly
  as it moves the data on.
  """
  peak, end = t.learning_rate, t.learning_rate * t.end_learning_rate_fraction
  warmup_steps = config_lib.warmup_steps(t)
  warmup = optax.linear_schedule(0.0, peak, max(1, warmup_steps))
  decay_steps = max(1, t.steps - warmup_steps)
  if t.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.end_learning_rate_fraction)
  elif t.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    raise ConfigError(f"train.schedule={t.schedule!r}: use 'linear' or 'cosine'")
  return optax.join_schedules([warmup, decay], [warmup_steps])


def param_name(path) -> str:
  """The last dict key of a pytree path: 'kernel', 'bias', 'scale', 'embedding'
  (also for the '/'-joined names of a layer-grouped tree, `layer_groups.group`)."""
  return str([k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]).rsplit("/", 1)[-1]


def _decay_mask(params):
  # No weight decay on biases and LayerNorm scales, as BERT and ELECTRA.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_name(path) not in ("bias", "scale"), params)


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW's update direction with global-norm clipping, before the learning rate.

  AdamW is clip -> Adam -> + weight_decay * param -> x (-lr). The last factor is
  applied by the train step as -schedule(state.step) (`apply_learning_rate`), so the
  learning rate is a function of the train step alone; Adam's own count (its bias
  correction) advances only on steps that are applied.
  """
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
      optax.add_decayed_weights(t.weight_decay, mask=_decay_mask))


def apply_learning_rate(direction, learning_rate):
  """The AdamW update: -learning_rate * direction."""
  return jax.tree.map(lambda d: -learning_rate * d, direction)


def abstract_model(objective):
  """(graphdef, abstract params) without allocating anything."""
  with cheap_tracer_errors():
    model = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def _init_and_shardings(objective, mesh, tx):
  """(graphdef, init fn, abstract state, state shardings, CheckpointForm); builds
  the model once, on the host, with its draws deferred."""
  config = objective.config
  graphdef, plan = deferred_init.plan_params(objective.build_model, config.train.seed)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), plan)
  params_sh = shd.param_shardings(abstract_params, mesh, config.sharding.rules)
  # One draw per layer-stacked parameter (model/deferred_init.py): the initializer
  # compiles a kernel per parameter group instead of one per layer.
  plan = group(plan, stack=deferred_init.stack_draws)

  def init():
    params = LayerStacked({name: deferred_init.value_of(leaf)
                           for name, leaf in plan.arrays.items()}, plan.layout)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      nonfinite_streak=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init)
  per_layer = jax.eval_shape(per_layer_state, abstract)
  per_layer_sh = TrainState(
      step=shd.replicated(mesh), params=params_sh,
      opt_state=shd.opt_state_shardings(tx, per_layer.opt_state, params_sh, mesh),
      nonfinite_streak=shd.replicated(mesh))
  # Each stacked leaf is sharded as its layers are, the layer axis unsplit; the
  # shardings take the state's own tree structure (the same leaves, in order).
  stacked_sh = per_layer_sh.replace(
      params=group(params_sh, stacked_sharding),
      opt_state=group_opt_state(per_layer_sh.opt_state, stacked_sharding))
  state_sh = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(stacked_sh))
  form = CheckpointForm(abstract_state(per_layer_sh, per_layer), per_layer_sh, state_sh)
  return graphdef, init, abstract, state_sh, form


def create_train_state(objective, mesh, tx):
  """Builds the model and optimizer state already sharded on `mesh`.

  Returns (graphdef, state, state_shardings); the state is layer-stacked.
  """
  return create_train_state_and_form(objective, mesh, tx)[:3]


def create_train_state_and_form(objective, mesh, tx):
  """`create_train_state`, and the state's `CheckpointForm`: (graphdef, state,
  state_shardings, form)."""
  graphdef, init, _, state_sh, form = _init_and_shardings(objective, mesh, tx)
  with jax.set_mesh(mesh):
    # The step's compiler options (on CPU, LLVM level 1: the same values).
    state = jax.jit(init, out_shardings=state_sh,
                    compiler_options=shd.compiler_options(mesh))()
  return graphdef, state, state_sh, form


def abstract_train_state(objective, mesh, tx):
  """(graphdef, ShapeDtypeStructs with shardings, shardings): nothing allocated.

  What `--compile_only` compiles against, on devices that need not exist.
  """
  graphdef, _, abstract, state_sh, _ = _init_and_shardings(objective, mesh, tx)
  return graphdef, abstract_state(state_sh, abstract), state_sh


class CheckpointForm:
  """Moves the trainer's layer-stacked state to and from the per-layer form that
  checkpoints hold (so checkpoints, their names and resharding are as before),
  placed with the shardings of each form.

  abstract: the per-layer state's ShapeDtypeStructs with their shardings (the
  restore target); shardings, stacked_shardings: those of each form.
  """

  def __init__(self, abstract, shardings, stacked_shardings):
    self.abstract = abstract
    self.to_checkpoint = jax.jit(per_layer_state, out_shardings=shardings)
    self.from_checkpoint = jax.jit(stack_state, out_shardings=stacked_shardings)

  @classmethod
  def of(cls, objective, mesh, tx) -> "CheckpointForm":
    """The form of the state `create_train_state` builds, built on its own."""
    return _init_and_shardings(objective, mesh, tx)[-1]


def abstract_state(state_shardings, state):
  """ShapeDtypeStructs carrying the current shardings: the restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, state_shardings)
