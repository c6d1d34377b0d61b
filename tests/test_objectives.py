"""The properties the ELECTRA and AMOS papers state, checked on tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.objectives import get_objective
from amos_jax.objectives.electra import replaced_token_labels
from tests.helpers import random_batch, tiny_config


def _loss_and_grads(objective, params, graphdef, batch, rng, key=None):
  def f(p, batch, rng):
    loss, metrics = objective.loss(nnx.merge(graphdef, p), batch,
                                   objective.loss_counts(batch), rng, True)
    return (metrics[key] if key else loss), metrics
  (value, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(
      params, batch, rng)
  return value, metrics, grads


def _loss(objective, params, graphdef, batch, rng, train=True):
  f = lambda p, b, r: objective.loss(nnx.merge(graphdef, p), b, objective.loss_counts(b),
                                     r, train)
  return jax.jit(f)(params, batch, rng)


def _split(objective, seed=0):
  return nnx.split(objective.build_model(nnx.Rngs(seed)), nnx.Param)


def _flat(state):
  return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}


def test_amos_with_one_tap_and_no_mixture_equals_electra():
  depth = 2
  e_cfg = tiny_config("electra", hidden_dropout=0.1, attention_dropout=0.1)
  e_cfg.objective.update(rtd_head_layers=1, sampling_temperature=1.0)
  e_cfg.objective.generator.update(width_fraction=1.0, num_layers=depth, dropout=True)
  a_cfg = tiny_config("amos", hidden_dropout=0.1, attention_dropout=0.1)
  a_cfg.objective.update(mixture=False, sampling_temperature=0.3)
  a_cfg.objective.generator.update(tap_layers=(depth,), dropout=True)
  # The same embedding sharing on both sides (AMOS's default, 'tokens').
  e_cfg.objective.embedding_sharing = a_cfg.objective.embedding_sharing
  electra, amos = get_objective(e_cfg), get_objective(a_cfg)

  e_graph, params = _split(electra)
  a_graph, a_params = _split(amos, seed=1)
  assert set(_flat(params)) == set(_flat(a_params)), "parameter trees differ"
  batch = random_batch(jax.random.key(0), 8, 32, 64, pad_tail=5)
  rng = jax.random.key(42)
  e_loss, e_m, e_g = _loss_and_grads(electra, params, e_graph, batch, rng)
  a_loss, a_m, a_g = _loss_and_grads(amos, params, a_graph, batch, rng)
  assert float(e_m["replaced_fraction"]) > 0.3
  np.testing.assert_allclose(a_loss, e_loss, rtol=1e-6)
  for k in ("mlm_loss", "rtd_loss", "rtd_accuracy"):
    np.testing.assert_allclose(a_m[k], e_m[k], rtol=1e-6)
  e_flat, a_flat = _flat(e_g), _flat(a_g)
  for k in e_flat:
    np.testing.assert_allclose(a_flat[k], e_flat[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_mixture_gradient_points_uphill_on_rtd():
  """A small optimizer step (along -grad) on the mixture raises the RTD loss.

  The hard sample makes the loss piecewise constant in the mixture, so this is
  measured on the soft relaxation: the function whose gradient the straight-through
  estimator passes back. `test_hard_sample_mixture_gradient_is_reversed` covers the
  hard path.
  """
  cfg = tiny_config("amos", initializer_range=0.5)
  cfg.objective.generator.tap_layers = (1, 2)
  cfg.objective.hard_sample = False
  amos = get_objective(cfg)
  graphdef, params = _split(amos)
  batch = random_batch(jax.random.key(0), 16, 64, 64)
  keys = [jax.random.key(7)]

  def rtd_and_grad(p):
    losses, grads = [], []
    for key in keys:
      _, m, g = _loss_and_grads(amos, p, graphdef, batch, key)
      losses.append(float(m["rtd_loss"]))
      grads.append(g["mixture"]["kernel"][...])
    return np.mean(losses), sum(grads) / len(grads)

  rtd0, g = rtd_and_grad(params)
  assert float(jnp.abs(g).max()) > 0, "no gradient reached the mixture"
  step = 1e-3 * g / jnp.linalg.norm(g)

  def rtd_after(delta):
    stepped = jax.tree.map(lambda x: x, params)
    stepped["mixture"]["kernel"][...] = params["mixture"]["kernel"][...] + delta
    return rtd_and_grad(stepped)[0]

  assert rtd_after(-step) > rtd0    # what the optimizer applies: uphill on RTD
  assert rtd_after(+step) < rtd0


def test_hard_sample_mixture_gradient_is_reversed():
  """With the hard sample, the mixture's gradient is exactly the negative of the
  gradient it would get without the reversal (the cooperative ablation)."""
  cfg = tiny_config("amos")
  cfg.objective.generator.tap_layers = (1, 2)
  graphdef, params = _split(get_objective(cfg))
  batch = random_batch(jax.random.key(0), 8, 32, 64)
  _, _, g_adv = _loss_and_grads(get_objective(cfg), params, graphdef, batch,
                                jax.random.key(1))
  cfg.objective.adversarial = False
  _, _, g_coop = _loss_and_grads(get_objective(cfg), params, graphdef, batch,
                                 jax.random.key(1))
  a, c = g_adv["mixture"]["kernel"][...], g_coop["mixture"]["kernel"][...]
  assert float(jnp.abs(a).max()) > 0
  np.testing.assert_allclose(a, -c, rtol=1e-5, atol=1e-9)
  # The discriminator's gradient is the same either way.
  np.testing.assert_allclose(g_adv["discriminator_head"]["dense_prediction"]["kernel"][...],
                             g_coop["discriminator_head"]["dense_prediction"]["kernel"][...],
                             rtol=1e-5)


def test_segment_isolation_between_taps():
  cfg = tiny_config("amos")
  cfg.objective.generator.tap_layers = (4, 6, 8)
  amos = get_objective(cfg)
  graphdef, params = _split(amos)
  batch = random_batch(jax.random.key(0), 4, 32, 64)
  rng = jax.random.key(3)

  def block_grad_norms(key):
    _, _, g = _loss_and_grads(amos, params, graphdef, batch, rng, key=key)
    layers = g["generator"]["encoder"]["layer"]
    return [sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(layers[i]))
            for i in range(8)]

  n4 = block_grad_norms("mlm_loss_4")
  assert all(n > 0 for n in n4[:4]) and all(n == 0 for n in n4[4:]), n4
  n6 = block_grad_norms("mlm_loss_6")
  assert all(n == 0 for n in n6[:4] + n6[6:]) and all(n > 0 for n in n6[4:6]), n6
  n8 = block_grad_norms("mlm_loss_8")
  assert all(n == 0 for n in n8[:6]) and all(n > 0 for n in n8[6:]), n8


def test_electra_rtd_gives_no_gradient_to_generator_only_params():
  cfg = tiny_config("electra")
  electra = get_objective(cfg)
  graphdef, params = _split(electra)
  batch = random_batch(jax.random.key(0), 8, 32, 64)
  _, _, g = _loss_and_grads(electra, params, graphdef, batch, jax.random.key(1),
                            key="rtd_loss")
  for part in ("generator", "generator_head"):
    total = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g[part]))
    assert total == 0.0, part
  # ... while the discriminator and the shared embeddings do learn from it.
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(
      g["discriminator"]["encoder"])) > 0
  assert float(jnp.abs(g["discriminator"]["embeddings"]["word_embeddings"]["embedding"][
      ...]).sum()) > 0


def test_a_sample_equal_to_the_original_is_labelled_original():
  positions = jnp.array([[1, 3, 5]])
  labels = jnp.array([[10, 11, 12]])
  sampled = jnp.array([[10, 99, 12]])   # slots 0 and 2 sampled the original
  weights = jnp.array([[1.0, 1.0, 0.0]])
  r = np.asarray(replaced_token_labels(positions, sampled, labels, weights, (1, 8)))
  np.testing.assert_array_equal(r[0], [0, 0, 0, 1, 0, 0, 0, 0])


def test_electra_labels_match_the_discriminator_input():
  # A 8-token vocabulary makes lucky samples frequent.
  cfg = tiny_config("electra", vocab_size=8)
  electra = get_objective(cfg)
  graphdef, params = _split(electra)
  batch = random_batch(jax.random.key(0), 8, 32, 8)
  _, m = _loss(electra, params, graphdef, batch, jax.random.key(2))
  # Some masked tokens were resampled to themselves: fewer replaced than masked.
  assert 0.0 < float(m["replaced_fraction"]) < 0.9


@pytest.mark.parametrize("name", ["mlm", "electra", "amos"])
def test_losses_are_finite_and_padding_invariant(name):
  """Changing what sits in padding positions changes nothing."""
  cfg = tiny_config(name)
  objective = get_objective(cfg)
  graphdef, params = _split(objective)
  batch = random_batch(jax.random.key(0), 8, 32, 64, pad_tail=6)
  other = dict(batch, input_ids=jnp.where(batch["segment_ids"] == 0, 7,
                                          batch["input_ids"]))
  l1, _ = _loss(objective, params, graphdef, batch, jax.random.key(1), train=False)
  l2, _ = _loss(objective, params, graphdef, other, jax.random.key(1), train=False)
  assert np.isfinite(float(l1))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
