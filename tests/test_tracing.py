"""Model builds inside a trace do not walk the trace once per random draw.

Without `cheap_tracer_errors`, every nnx.Rngs draw under eval_shape or jit makes
JAX compute a tracer error message (flax asks a tracer for its `sharding`), and
that message walks the trace built so far: quadratic in the parameter count. The
tests count those walks and check that the shortened messages change nothing else.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe

from amos_jax import config as config_lib
from amos_jax.model import tracing
from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.objectives import get_objective
from amos_jax.train import sharding as shd
from amos_jax.train import state as state_lib
from amos_jax.train.step import make_optimizer

from helpers import tiny_config


@pytest.fixture
def walks(monkeypatch):
  """A list that grows by one per walk back to a tracer's origins."""
  calls = []
  original = pe.JaxprStackFrame.find_progenitors

  def counting(self, tracer):
    calls.append(1)
    return original(self, tracer)

  monkeypatch.setattr(pe.JaxprStackFrame, "find_progenitors", counting)
  return calls


def _encoder_cfg():
  return EncoderConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                       intermediate_size=64, max_position_embeddings=32)


def test_the_patched_method_exists_in_this_jax():
  """If JAX renames it the helper silently does nothing: fail here instead."""
  assert tracing._ORIGINAL is not None
  assert tracing.TRACER._origin_msg is tracing._ORIGINAL


def test_a_traced_model_build_walks_the_trace_only_without_the_helper(walks):
  cfg = _encoder_cfg()
  nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  # One walk per draw (the cost the helper removes), as long as flax asks.
  assert len(walks) >= 3 * 6
  walks.clear()
  with tracing.cheap_tracer_errors():
    nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  assert walks == []


def test_trainer_state_builds_walk_no_origins_and_draw_the_same_values(walks):
  """abstract_model goes through the helper, and the state's build (a host-side
  build with deferred draws, model/deferred_init.py) walks no origins either; the
  jitted initializer draws what it draws eagerly (the normal's float transform may
  round differently compiled), and LLVM level 1 (the trainer's CPU option) gives
  level 2's values bit for bit."""
  config = config_lib.freeze(tiny_config("electra"))
  objective = get_objective(config)
  mesh = shd.build_mesh(config.mesh)
  tx = make_optimizer(config.train)
  _, state, _ = state_lib.create_train_state(objective, mesh, tx)
  assert walks == []
  _, init, _, _, _ = state_lib._init_and_shardings(objective, mesh, tx)
  leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
  for a, b in zip(leaves, jax.tree.leaves(init())):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-9)
  lowered = jax.jit(init).lower()
  o1, o2 = (jax.tree.leaves(lowered.compile({"xla_backend_optimization_level": n})())
            for n in (1, 2))
  for a, b in zip(o1, o2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors_keep_their_type_and_the_message_returns_after_the_block():
  seen = {}

  def f(x):
    with tracing.cheap_tracer_errors():
      seen["hasattr"] = hasattr(x, "sharding")
      seen["getattr"] = getattr(x, "sharding", "default")
      with pytest.raises(jax.errors.TracerBoolConversionError):
        bool(x > 0)
    with pytest.raises(jax.errors.TracerBoolConversionError) as outside:
      bool(x > 0)
    seen["outside"] = str(outside.value)
    return x

  jax.jit(f)(jnp.ones(()))
  assert seen["hasattr"] is False and seen["getattr"] == "default"
  assert "The error occurred while tracing" in seen["outside"]


def test_nested_and_failing_blocks_restore_the_original():
  with pytest.raises(RuntimeError):
    with tracing.cheap_tracer_errors():
      with tracing.cheap_tracer_errors():
        pass
      assert tracing.TRACER._origin_msg is not tracing._ORIGINAL
      raise RuntimeError("inside")
  assert tracing.TRACER._origin_msg is tracing._ORIGINAL
