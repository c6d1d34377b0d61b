import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scipy import stats

from amos_jax.model import rng as rng_lib
from amos_jax.objectives.sampling import (gumbel_max_sample, gumbel_noise,
                                          gumbel_softmax_straight_through,
                                          inverse_cdf_sample, reverse_gradient)


def test_reverse_gradient_is_identity_forward_and_negates_backward():
  x = jax.random.normal(jax.random.key(0), (3, 5))
  w = jax.random.normal(jax.random.key(1), (3, 5))
  np.testing.assert_array_equal(reverse_gradient(x), x)
  f = lambda x: jnp.sum(jnp.sin(x) * w)
  g_plain = jax.grad(f)(x)
  g_rev = jax.grad(lambda x: f(reverse_gradient(x)))(x)
  np.testing.assert_allclose(g_rev, -g_plain, rtol=1e-6)
  assert np.abs(g_plain).min() > 0


def test_straight_through_gumbel_softmax_is_one_hot_forward_soft_backward():
  logits = jax.random.normal(jax.random.key(0), (4, 7))
  noise = gumbel_noise(jax.random.key(1), logits.shape)
  tau = 0.3
  y = gumbel_softmax_straight_through(logits, noise, tau)
  # Exactly one-hot, at the Gumbel-max argmax.
  np.testing.assert_array_equal(np.asarray(y).sum(-1), 1.0)
  assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
  np.testing.assert_array_equal(y.argmax(-1), gumbel_max_sample(logits, noise))
  # Backward is the soft sample's gradient.
  w = jax.random.normal(jax.random.key(2), (4, 7))
  g_st = jax.grad(lambda l: jnp.sum(gumbel_softmax_straight_through(l, noise, tau) * w))(
      logits)
  g_soft = jax.grad(lambda l: jnp.sum(jax.nn.softmax((l + noise) / tau) * w))(logits)
  np.testing.assert_allclose(g_st, g_soft, rtol=1e-5, atol=1e-7)
  assert np.abs(g_soft).max() > 1e-3


def test_gumbel_max_sampling_follows_the_softmax():
  logits = jnp.log(jnp.array([0.1, 0.6, 0.3]))
  noise = gumbel_noise(jax.random.key(0), (20000, 3))
  counts = np.bincount(np.asarray(gumbel_max_sample(logits, noise)), minlength=3) / 20000
  np.testing.assert_allclose(counts, [0.1, 0.6, 0.3], atol=0.015)


@pytest.mark.parametrize("block", [2, 3, 256])
def test_inverse_cdf_sampling_follows_the_tempered_softmax(block):
  """ELECTRA's default sampler draws from softmax(logits / T): a chi-square test on
  40,000 draws at T = 2 (an off-by-one index, a wrong block offset or a missing
  temperature fails it), and a zero-probability word is never drawn. Blocks of 2
  and 3 words split the 5-word vocabulary (with padding); 256 holds it whole."""
  p = np.array([0.05, 0.4, 0.0, 0.25, 0.3])
  logits = jnp.log(jnp.asarray(p, jnp.float32))        # -inf for the impossible word
  t = 2.0
  n = 40000
  draws = np.asarray(inverse_cdf_sample(jax.random.key(0), jnp.broadcast_to(logits, (n, 5)), t,
                                        block=block))
  counts = np.bincount(draws, minlength=5)
  assert counts[2] == 0
  q = p ** (1 / t) / (p ** (1 / t)).sum()
  keep = q > 0
  assert stats.chisquare(counts[keep], n * q[keep]).pvalue > 1e-3, counts
  # The untempered law is far from it: the test can tell them apart.
  assert stats.chisquare(counts[keep], n * p[keep]).pvalue < 1e-6


def test_inverse_cdf_sampling_is_per_row_deterministic():
  """With a key per row, row i's sample depends on its key alone (gradient
  accumulation draws what the whole batch draws)."""
  logits = jax.random.normal(jax.random.key(1), (6, 3, 50)) * 3
  keys = rng_lib.per_row(jax.random.key(7), jnp.arange(6))
  whole = inverse_cdf_sample(keys, logits, block=16)
  for i in range(6):
    np.testing.assert_array_equal(
        whole[i], inverse_cdf_sample(keys[i:i + 1], logits[i:i + 1], block=16)[0])
  # A near one-hot row always gives its word, in any block.
  for word in (0, 17, 49):
    sure = jnp.zeros((4, 50)).at[:, word].set(100.0)
    np.testing.assert_array_equal(inverse_cdf_sample(jax.random.key(3), sure, block=16), word)


def test_straight_through_gradient_is_the_tempered_softmax_jacobian():
  """AMOS's mixture gradient at tau = 0.3, against the analytic Jacobian in NumPy:
  y = softmax((l + g) / tau), dy/dl = (diag(y) - y y^T) / tau, so the gradient of
  <y_hard, w> with respect to l is y * (w - <y, w>) / tau."""
  tau = 0.3
  rng = np.random.default_rng(0)
  logits = 0.3 * rng.normal(size=(6, 9))
  noise = -np.log(-np.log(rng.uniform(size=(6, 9))))
  w = rng.normal(size=(6, 9))
  grad = jax.grad(lambda l: jnp.sum(gumbel_softmax_straight_through(
      l, jnp.asarray(noise, jnp.float32), tau) * jnp.asarray(w, jnp.float32)))(
          jnp.asarray(logits, jnp.float32))
  z = (logits + noise) / tau
  y = np.exp(z - z.max(-1, keepdims=True))
  y /= y.sum(-1, keepdims=True)
  expected = y * (w - (y * w).sum(-1, keepdims=True)) / tau
  assert np.abs(expected).max() > 0.05, "a saturated softmax would hide the temperature"
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
