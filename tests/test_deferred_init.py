"""The trainer draws each layer-stacked parameter once (model/deferred_init.py) and
gets the plain construction's parameters bit for bit."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax import config as config_lib
from amos_jax.model import deferred_init
from amos_jax.model.encoder import normal_init
from amos_jax.model.partitioning import with_logical_axes
from amos_jax.objectives import get_objective
from amos_jax.train import sharding as shd
from amos_jax.train import state as state_lib
from amos_jax.train.layer_groups import group
from amos_jax.train.step import make_optimizer

from helpers import tiny_config


def _plain_params(objective, seed):
  """The parameters as the model builds them inside jit: one draw per parameter."""
  def build():
    return group(nnx.split(objective.build_model(nnx.Rngs(seed)), nnx.Param)[1])
  return jax.jit(build)()


def _trainer_parts(name, objective_options=None, **model):
  config = tiny_config(name, **model)
  config.objective.update(objective_options or {})
  config.train.seed = 7
  config = config_lib.freeze(config)
  objective = get_objective(config)
  return objective, shd.build_mesh(config.mesh), make_optimizer(config.train)


@pytest.mark.parametrize("name,objective_options,model", [
    ("electra", {}, {}),
    ("electra", {"embedding_sharing": "gdes"}, {"relative_attention_buckets": 8}),
    ("amos", {}, {}),
    ("mlm", {}, {}),
    ("classify", {"num_labels": 3}, {}),
    ("tests.objective_example", {}, {}),
])
def test_the_trainer_state_holds_the_plain_constructions_parameters(
    name, objective_options, model):
  objective, mesh, tx = _trainer_parts(name, objective_options, num_layers=3, **model)
  _, state, _ = state_lib.create_train_state(objective, mesh, tx)
  plain = _plain_params(objective, 7)
  assert list(state.params.arrays) == list(plain.arrays)
  for key in plain.arrays:
    np.testing.assert_array_equal(np.asarray(state.params[key]), np.asarray(plain[key]),
                                  err_msg=key)
  # The seed is honoured: another seed draws other values.
  other = _plain_params(objective, 8)
  key = next(k for k in plain.arrays if k.endswith("query/kernel"))
  assert not np.array_equal(np.asarray(state.params[key]), np.asarray(other[key]))


def _random_draws(jaxpr) -> int:
  """How many random_bits the program draws (sub-programs included)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "random_bits"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _random_draws(sub)
  return count


def test_the_initializer_draws_once_per_parameter_whatever_the_depth():
  draws = {}
  for layers in (2, 5):
    objective, mesh, tx = _trainer_parts("electra", num_layers=layers)
    _, init, _, _, _ = state_lib._init_and_shardings(objective, mesh, tx)
    draws[layers] = _random_draws(jax.make_jaxpr(init)().jaxpr)
    plain = jax.make_jaxpr(
        lambda: nnx.split(objective.build_model(nnx.Rngs(0)), nnx.Param)[1])().jaxpr
    draws[layers, "plain"] = _random_draws(plain)
  assert draws[2] == draws[5] > 0
  # Drawn layer by layer, the count grows with depth (the property's witness).
  assert draws[5, "plain"] - draws[2, "plain"] == 3 * 2 * 6  # 3 layers x 2 encoders x 6 kernels


class _Toy(nnx.Module):
  """Layers drawn alike, layers drawn differently, and a parameter whose
  initializer is not deferred (nnx's own default)."""

  def __init__(self, rngs):
    self.layer = nnx.List([
        nnx.Linear(4, 3, kernel_init=with_logical_axes(normal_init(0.5), ("embed", "mlp")),
                   bias_init=with_logical_axes(
                       nnx.initializers.normal(1.0) if i == 1 else nnx.initializers.zeros,
                       ("mlp",)),
                   rngs=rngs)
        for i in range(3)])
    self.head = nnx.Linear(3, 2, rngs=rngs)


def test_layers_drawn_differently_and_undeferred_parameters_keep_their_values():
  _, plan = deferred_init.plan_params(_Toy, 3)
  plan = group(plan, stack=deferred_init.stack_draws)
  kernel, bias, head = (plan[n] for n in ("layer/*/kernel", "layer/*/bias", "head/kernel"))
  assert isinstance(kernel, deferred_init.Draw) and kernel.layers == 3
  assert isinstance(bias, list)              # layer 1's bias is drawn otherwise
  assert isinstance(head, np.ndarray)        # nnx's default initializer: not deferred
  drawn = jax.jit(lambda: {n: deferred_init.value_of(leaf) for n, leaf in plan.arrays.items()})()
  plain = jax.jit(lambda: group(nnx.split(_Toy(nnx.Rngs(3)), nnx.Param)[1]).arrays)()
  for name in plain:
    np.testing.assert_array_equal(np.asarray(drawn[name]), np.asarray(plain[name]),
                                  err_msg=name)
  assert np.asarray(drawn["layer/*/bias"])[1].std() > 0.1


def test_outside_planning_the_initializer_draws_at_once():
  init = deferred_init.deferrable(nnx.initializers.normal(1.0))
  x = init(jax.random.key(0), (3, 2), jnp.float32)
  assert isinstance(x, jax.Array)
  np.testing.assert_array_equal(
      np.asarray(x), np.asarray(jax.random.normal(jax.random.key(0), (3, 2))))
