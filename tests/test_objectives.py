"""The properties the ELECTRA and AMOS papers state, checked on tiny models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.objectives import amos as amos_module
from amos_jax.objectives import electra as electra_module
from amos_jax.objectives import get_objective
from amos_jax.objectives.electra import replaced_token_labels
from tests.helpers import fast_compile, random_batch, tiny_config


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with fast_compile():
    yield


@functools.cache
def _jitted(objective, graphdef, metrics=None, train=True):
  """jit(params, batch, rng) -> ((value, metrics), grads) of the loss, or of
  metrics[k] for the names in `metrics` (a list of grads, one vjp each, when there
  are several). Cached: the same objective and graphdef compile once."""
  def values(p, batch, rng):
    loss, m = objective.loss(nnx.merge(graphdef, p), batch, objective.loss_counts(batch),
                             rng, train)
    return (loss if metrics is None else jnp.stack([m[k] for k in metrics])), m

  if metrics is None or len(metrics) == 1:
    def scalar(p, batch, rng):
      value, m = values(p, batch, rng)
      return (value if metrics is None else value[0]), m
    return jax.jit(jax.value_and_grad(scalar, has_aux=True))

  def several(p, batch, rng):
    value, vjp, m = jax.vjp(lambda p: values(p, batch, rng), p, has_aux=True)
    eye = jnp.eye(len(metrics))
    return (value, m), [vjp(eye[i])[0] for i in range(len(metrics))]
  return jax.jit(several)


def _loss_and_grads(objective, params, graphdef, batch, rng, key=None):
  """(loss or metrics[key], metrics, grads)."""
  (value, metrics), grads = _jitted(objective, graphdef, (key,) if key else None)(
      params, batch, rng)
  return value, metrics, grads


@functools.cache
def _loss_fn(objective, graphdef, train):
  return jax.jit(lambda p, b, r: objective.loss(nnx.merge(graphdef, p), b,
                                                objective.loss_counts(b), r, train))


def _loss(objective, params, graphdef, batch, rng, train=True):
  return _loss_fn(objective, graphdef, train)(params, batch, rng)


def _split(objective, seed=0):
  return nnx.split(objective.build_model(nnx.Rngs(seed)), nnx.Param)


def _flat(state):
  return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}


def _norm(tree) -> float:
  return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree))


def test_amos_with_one_tap_and_no_mixture_equals_electra():
  depth = 2
  e_cfg = tiny_config("electra", hidden_dropout=0.1, attention_dropout=0.1)
  # AMOS's hard Gumbel-softmax draws with Gumbel noise: so does ELECTRA's Gumbel-max.
  e_cfg.objective.update(rtd_head_layers=1, sampling_temperature=1.0, sampler="gumbel")
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
  estimator passes back. `test_rtd_gradient_reaches_the_generator_reversed` covers
  the hard path.
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


def test_rtd_gradient_reaches_the_generator_reversed(monkeypatch):
  """The hard-sample RTD gradient reaches the mixture AND every generator block
  (the mixture reads the generator's features, not their stop_gradient), and it is
  exactly the negative of the gradient without the reversal (the cooperative
  ablation); the discriminator's gradient is the same either way. The sample is
  drawn at the configured Gumbel temperature."""
  temperatures = []
  st = amos_module.gumbel_softmax_straight_through

  def spy(logits, noise, temperature):
    temperatures.append(temperature)
    return st(logits, noise, temperature)

  monkeypatch.setattr(amos_module, "gumbel_softmax_straight_through", spy)
  cfg = tiny_config("amos", num_layers=1)
  cfg.objective.update(sampling_temperature=0.3, mlm_weight=0.0)
  cfg.objective.generator.tap_layers = (1, 2)
  graphdef, params = _split(get_objective(cfg))
  batch = random_batch(jax.random.key(0), 8, 32, 64)
  _, _, g_adv = _loss_and_grads(get_objective(cfg), params, graphdef, batch,
                                jax.random.key(1))
  assert temperatures and set(temperatures) == {0.3}, temperatures
  cfg.objective.adversarial = False
  _, _, g_coop = _loss_and_grads(get_objective(cfg), params, graphdef, batch,
                                 jax.random.key(1))
  layers = g_adv["generator"]["encoder"]["layer"]
  for i in range(2):
    assert _norm(layers[i]) > 0, f"generator block {i} got no RTD gradient"
  for part in (("mixture", "kernel"), ("generator", "encoder", "layer", 0, "attention",
                                       "self", "query", "kernel"),
               ("generator", "encoder", "layer", 1, "output", "dense", "kernel")):
    a, c = g_adv, g_coop
    for k in part:
      a, c = a[k], c[k]
    assert float(jnp.abs(a[...]).max()) > 0, part
    np.testing.assert_allclose(a[...], -c[...], rtol=1e-5, atol=1e-9, err_msg=str(part))
  np.testing.assert_allclose(g_adv["discriminator_head"]["dense_prediction"]["kernel"][...],
                             g_coop["discriminator_head"]["dense_prediction"]["kernel"][...],
                             rtol=1e-5)


def test_segment_isolation_between_taps():
  cfg = tiny_config("amos", num_layers=1)
  cfg.objective.generator.tap_layers = (4, 6, 8)
  amos = get_objective(cfg)
  graphdef, params = _split(amos)
  batch = random_batch(jax.random.key(0), 4, 32, 64)
  names = ("mlm_loss_4", "mlm_loss_6", "mlm_loss_8")
  _, grads = _jitted(amos, graphdef, names)(params, batch, jax.random.key(3))

  def block_grad_norms(g):
    return [_norm(g["generator"]["encoder"]["layer"][i]) for i in range(8)]

  n4, n6, n8 = map(block_grad_norms, grads)
  assert all(n > 0 for n in n4[:4]) and all(n == 0 for n in n4[4:]), n4
  assert all(n == 0 for n in n6[:4] + n6[6:]) and all(n > 0 for n in n6[4:6]), n6
  assert all(n == 0 for n in n8[:6]) and all(n > 0 for n in n8[6:]), n8


def test_a_sample_equal_to_the_original_is_labelled_original():
  positions = jnp.array([[1, 3, 5]])
  labels = jnp.array([[10, 11, 12]])
  sampled = jnp.array([[10, 99, 12]])   # slots 0 and 2 sampled the original
  weights = jnp.array([[1.0, 1.0, 0.0]])
  r = np.asarray(replaced_token_labels(positions, sampled, labels, weights, (1, 8)))
  np.testing.assert_array_equal(r[0], [0, 0, 0, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("name", ["electra", "amos"])
def test_rtd_labels_and_loss_follow_the_discriminator_input(name, monkeypatch):
  """What the discriminator reads and what it is told, compared with a NumPy
  reference: a token is labelled replaced iff it differs from the ORIGINAL token at
  that position (a lucky sample is original; padding is never replaced), and the
  RTD loss is the sigmoid cross-entropy averaged over the real tokens only.
  An 8-token vocabulary makes lucky samples frequent."""
  cfg = tiny_config(name, vocab_size=8, num_layers=1)
  objective = get_objective(cfg)
  model = objective.build_model(nnx.Rngs(0))
  module = electra_module if name == "electra" else amos_module
  calls, rtd_loss = [], module.rtd_loss

  def spy(model, batch, counts, input_ids, is_replaced, rng, *, replace=None):
    calls.append((input_ids, is_replaced, replace))
    return rtd_loss(model, batch, counts, input_ids, is_replaced, rng, replace=replace)

  monkeypatch.setattr(module, "rtd_loss", spy)
  batch = random_batch(jax.random.key(0), 8, 32, 8, pad_tail=9)
  _, metrics = objective.loss(model, batch, objective.loss_counts(batch),
                              jax.random.key(2), False)
  ((input_ids, is_replaced, replace),) = calls
  ids, original = np.asarray(input_ids), np.asarray(batch["input_ids"])
  real = np.asarray(batch["segment_ids"]) > 0
  labels = np.asarray(is_replaced)
  np.testing.assert_array_equal(labels, (ids != original) & real)
  # Some masked slots sampled their original token: fewer replaced than masked.
  assert 0.0 < float(metrics["replaced_fraction"]) < 0.9
  if replace is not None:  # AMOS: the rows fed in are the sampled tokens' embeddings
    index, rows = replace
    matrix = np.asarray(model.discriminator.word_embeddings)
    np.testing.assert_allclose(rows, matrix[np.take_along_axis(ids, np.asarray(index), 1)],
                               rtol=1e-6, atol=1e-7)

  hidden = model.discriminator(input_ids, batch["segment_ids"], replace=replace)[-1]
  logits = np.asarray(model.discriminator_head(hidden), np.float64)
  xent = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  np.testing.assert_allclose(metrics["rtd_loss"], (xent * real).sum() / real.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["rtd_accuracy"],
                             (((logits > 0) == labels) & real).sum() / real.sum(), rtol=1e-6)


@pytest.mark.parametrize("name", ["mlm", "electra", "amos"])
def test_losses_are_finite_and_padding_invariant(name):
  """Changing what sits in padding positions changes nothing."""
  cfg = tiny_config(name, num_layers=1)
  objective = get_objective(cfg)
  graphdef, params = _split(objective)
  batch = random_batch(jax.random.key(0), 8, 32, 64, pad_tail=6)
  other = dict(batch, input_ids=jnp.where(batch["segment_ids"] == 0, 7,
                                          batch["input_ids"]))
  l1, _ = _loss(objective, params, graphdef, batch, jax.random.key(1), train=False)
  l2, _ = _loss(objective, params, graphdef, other, jax.random.key(1), train=False)
  assert np.isfinite(float(l1))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
