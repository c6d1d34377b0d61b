"""Embedding sharing between generator and discriminator (METHODS.md section 4):
which parameters exist, and which loss term's gradient reaches which of them.

  all     one embedding block, read by both encoders (ELECTRA)
  tokens  only the token matrix is shared; the generator keeps its own position and
          token-type embeddings and LayerNorm (AMOS's reference code)
  gdes    the discriminator reads stop_gradient(E_G) + E_delta: MLM alone trains
          E_G, RTD alone trains E_delta (DeBERTa-v3)

The gradients of the two loss terms are taken separately (the `mlm_loss` and
`rtd_loss` the objective reports; the loss is mlm_weight * one + rtd_weight * the
other). AMOS is checked with its mixture on and off: with the mixture on, the
reversed RTD gradient reaches the generator's features, and through them the
generator's own embeddings (and E_G, which the generator reads), by design: the
mixture is trained adversarially through the generator's hidden states, as in the
reference model. The direct paths are the same either way.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.objectives import get_objective
from tests.helpers import fast_compile, random_batch, tiny_config

DISC = "discriminator/embeddings/"
GEN = "generator/embeddings/"
E_G = DISC + "word_embeddings/embedding"
E_DELTA = DISC + "word_embeddings_delta"
OWN = ("position_embeddings/embedding", "token_type_embeddings/embedding",
       "LayerNorm/scale", "LayerNorm/bias")

# (objective, mixture): ELECTRA, and AMOS with the mixture on and off.
MODELS = [("electra", False), ("amos", True), ("amos", False)]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with fast_compile():
    yield


def _config(name, sharing, mixture):
  c = tiny_config(name, num_layers=1)
  c.objective.embedding_sharing = sharing
  if name == "amos":
    c.objective.mixture = mixture
  return c


def _flat(state):
  return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


@functools.cache
def term_gradients(name, sharing, mixture):
  """(objective, graphdef, params, grads of mlm_loss, grads of rtd_loss), flat."""
  objective = get_objective(_config(name, sharing, mixture))
  graphdef, params = nnx.split(objective.build_model(nnx.Rngs(0)), nnx.Param)
  batch = random_batch(jax.random.key(0), 4, 16, 64, pad_tail=3)

  @jax.jit
  def grads(params):
    def terms(p):
      _, m = objective.loss(nnx.merge(graphdef, p), batch, objective.loss_counts(batch),
                            jax.random.key(1), True)
      return jnp.stack([m["mlm_loss"], m["rtd_loss"]])
    _, vjp = jax.vjp(terms, params)
    return vjp(jnp.array([1.0, 0.0]))[0], vjp(jnp.array([0.0, 1.0]))[0]

  g_mlm, g_rtd = grads(params)
  return objective, graphdef, params, _flat(g_mlm), _flat(g_rtd)


def _reaches(grads, path) -> bool:
  return float(np.abs(grads[path]).sum()) > 0


def _check_generator_only_params(g_rtd, mixture):
  """No RTD gradient reaches the generator's head (its logits are sampled under
  stop_gradient); its blocks get one only through AMOS's mixture, every block."""
  head = [p for p in g_rtd if p.startswith("generator_head/")]
  assert head and not [p for p in head if _reaches(g_rtd, p)]
  blocks = {}
  for p in g_rtd:
    if p.startswith("generator/encoder/layer/"):
      blocks.setdefault(p.split("/")[3], []).append(_reaches(g_rtd, p))
  assert blocks
  for i, reached in blocks.items():
    assert any(reached) == mixture, f"generator block {i}"
  if not mixture:
    assert not [p for p in g_rtd if p.startswith("generator/") and _reaches(g_rtd, p)]
  # The discriminator does learn from it.
  assert _reaches(g_rtd, "discriminator/encoder/layer/0/output/dense/kernel")


@pytest.mark.parametrize("name,mixture", MODELS[:2])
def test_all_shares_the_whole_block(name, mixture):
  objective, _, params, g_mlm, g_rtd = term_gradients(name, "all", mixture)
  assert not [p for p in _flat(params) if p.startswith(GEN)], "the generator has its own"
  model = objective.build_model(nnx.Rngs(0))
  assert model.generator.embeddings is model.discriminator.embeddings
  # The generator's MLM loss trains the one block, position embeddings included.
  for part in OWN[:3] + ("word_embeddings/embedding",):
    assert _reaches(g_mlm, DISC + part), part
    assert _reaches(g_rtd, DISC + part), part
  _check_generator_only_params(g_rtd, mixture)


@pytest.mark.parametrize("name,mixture", MODELS)
def test_tokens_shares_only_the_token_matrix(name, mixture):
  objective, _, params, g_mlm, g_rtd = term_gradients(name, "tokens", mixture)
  flat = _flat(params)
  assert {GEN + p for p in OWN} <= set(flat)
  assert not [p for p in flat if p.startswith(GEN + "word_embeddings")], (
      "the generator has its own token matrix")
  model = objective.build_model(nnx.Rngs(0))
  assert model.generator.embeddings.word_embeddings is (
      model.discriminator.embeddings.word_embeddings)
  # The token matrix learns from both losses ...
  assert _reaches(g_mlm, E_G) and _reaches(g_rtd, E_G)
  for part in OWN:
    # ... the generator's MLM loss never reaches the discriminator's own block ...
    assert not _reaches(g_mlm, DISC + part), part
    assert _reaches(g_rtd, DISC + part), part
    assert _reaches(g_mlm, GEN + part), part
    # ... and the RTD loss reaches the generator's own only through AMOS's mixture.
    assert _reaches(g_rtd, GEN + part) == mixture, part
  _check_generator_only_params(g_rtd, mixture)


@pytest.mark.parametrize("name,mixture", MODELS)
def test_gdes_mlm_trains_e_g_and_rtd_trains_e_delta(name, mixture):
  objective, graphdef, params, g_mlm, g_rtd = term_gradients(name, "gdes", mixture)
  flat = _flat(params)
  assert E_DELTA in flat and not float(np.abs(flat[E_DELTA]).max()), "E_delta starts at 0"
  assert not [p for p in flat if p.startswith(GEN + "word_embeddings")]
  assert _reaches(g_mlm, E_G) and not _reaches(g_mlm, E_DELTA)
  assert _reaches(g_rtd, E_DELTA)
  # E_G gets no RTD gradient, except AMOS's reversed one through the generator.
  assert _reaches(g_rtd, E_G) == mixture
  for part in OWN:
    assert not _reaches(g_mlm, DISC + part), part
  _check_generator_only_params(g_rtd, mixture)


def test_gdes_discriminator_reads_e_g_plus_e_delta():
  """The discriminator's matrix is E_G + E_delta (its embeddings equal those of a
  model whose E_G holds the sum), the generator's is E_G, and export writes both."""
  objective = get_objective(_config("electra", "gdes", False))
  build = lambda: objective.build_model(nnx.Rngs(0))  # the same initial values
  model = build()
  delta = 0.1 * jax.random.normal(jax.random.key(5),
                                  model.discriminator.embeddings.word_embeddings_delta.shape)
  model.discriminator.embeddings.word_embeddings_delta[...] = delta
  e_g = model.discriminator.embeddings.word_embeddings.embedding[...]
  np.testing.assert_allclose(model.discriminator.word_embeddings, e_g + delta, rtol=1e-6)
  np.testing.assert_array_equal(model.generator.word_embeddings, e_g)

  ids = jax.random.randint(jax.random.key(6), (2, 16), 5, 64)
  seg = jnp.ones_like(ids)
  with_delta = model.discriminator(ids, seg)[0]
  summed = build()
  summed.discriminator.embeddings.word_embeddings.embedding[...] = e_g + delta
  np.testing.assert_allclose(with_delta, summed.discriminator(ids, seg)[0], rtol=1e-5,
                             atol=1e-6)
  plain = build().discriminator(ids, seg)[0]  # E_delta = 0
  assert float(jnp.abs(with_delta - plain).max()) > 1e-3

  exported = objective.export_params(
      {tuple(k): v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
  assert tuple(E_DELTA.split("/")) not in exported
  np.testing.assert_allclose(exported[tuple(E_G.split("/"))], e_g + delta, rtol=1e-6)
  np.testing.assert_array_equal(
      exported[("generator", "embeddings", "word_embeddings", "embedding")], e_g)
