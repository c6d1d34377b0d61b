"""The encoder: hidden states, dtype policy, packed-document isolation, remat, and
logical axis names on every parameter."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amos_jax.model.encoder import Encoder, EncoderConfig

CFG = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, embedding_size=16, max_position_embeddings=32,
                    hidden_dropout=0.0, attention_dropout=0.0)


def _run(cfg, ids, seg, pos=None):
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  f = jax.jit(lambda p, i, s, q: nnx.merge(graphdef, p)(i, s, q))
  return f(params, ids, seg, pos), params


def test_all_hidden_states_and_dtype_policy():
  ids = jnp.ones((2, 8), jnp.int32)
  seg = jnp.ones((2, 8), jnp.int32)
  hs, params = _run(dataclasses.replace(CFG, dtype="bfloat16"), ids, seg)
  assert len(hs) == CFG.num_layers + 1
  assert all(h.shape == (2, 8, 32) and h.dtype == jnp.bfloat16 for h in hs)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_packed_documents_do_not_see_each_other():
  """Document A packed before document B gives A's hidden states as if alone."""
  rng = np.random.default_rng(0)
  a, b = rng.integers(5, 50, 6), rng.integers(5, 50, 9)
  packed = jnp.asarray(np.concatenate([a, b, [0]])[None], jnp.int32)
  seg = jnp.asarray([[1] * 6 + [2] * 9 + [0]], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(9)) + [0]], jnp.int32)
  hs_packed, _ = _run(CFG, packed, seg, pos)
  alone_a, _ = _run(CFG, jnp.asarray(a[None], jnp.int32), jnp.ones((1, 6), jnp.int32))
  alone_b, _ = _run(CFG, jnp.asarray(b[None], jnp.int32), jnp.ones((1, 9), jnp.int32))
  np.testing.assert_allclose(hs_packed[-1][0, :6], alone_a[-1][0], atol=1e-5)
  np.testing.assert_allclose(hs_packed[-1][0, 6:15], alone_b[-1][0], atol=1e-5)
  assert np.isfinite(np.asarray(hs_packed[-1])).all()


def test_remat_changes_nothing_but_memory():
  ids = jax.random.randint(jax.random.key(0), (2, 8), 5, 50)
  seg = jnp.ones((2, 8), jnp.int32)

  def grads(cfg):
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    # A random readout: the squared norm of a LayerNorm output is nearly constant.
    w = jax.random.normal(jax.random.key(1), (2, 8, 32))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, seg)[-1] * w)
    return jax.jit(jax.grad(loss))(params)

  g0, g1 = grads(CFG), grads(dataclasses.replace(CFG, remat=True))
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_every_parameter_has_logical_axis_names():
  cfg = dataclasses.replace(CFG, relative_attention_buckets=8)
  model = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  _, params = nnx.split(model, nnx.Param)
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.shape.__len__(), path
