"""Mixed precision: float32 parameters, gradients and optimizer state; bfloat16
compute (`model.dtype`) with float32 softmax, LayerNorm statistics and losses gives
the float32 loss within bfloat16 rounding on the same batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.model import rng as rng_lib
from amos_jax.objectives import get_objective
from tests.helpers import random_batch, tiny_config


@pytest.mark.parametrize("name", ["electra", "amos"])
def test_bfloat16_loss_matches_float32(name):
  batch = random_batch(jax.random.key(0), 8, 32, 64, pad_tail=5)
  rng = rng_lib.per_row(jax.random.key(1), jnp.arange(8))
  out = {}
  for dtype in ("float32", "bfloat16"):
    objective = get_objective(tiny_config(name, dtype=dtype))
    graphdef, params = nnx.split(objective.build_model(nnx.Rngs(0)), nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

    def f(p):
      return objective.loss(nnx.merge(graphdef, p), batch, objective.loss_counts(batch),
                            rng, True)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    out[dtype] = metrics
  for k in ("mlm_loss", "rtd_loss"):
    np.testing.assert_allclose(out["bfloat16"][k], out["float32"][k], rtol=2e-2, err_msg=k)
