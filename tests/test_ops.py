"""The hand-written backward passes of amos_jax.model.ops against autodiff.

The references are the plain formulas written out here in jnp (x @ W + b, two-pass
LayerNorm, erf GELU, masked softmax -> dropout -> @ V) and differentiated by JAX; the ops must
give the same values and the same gradients for every input, and keep fewer
residuals for the backward pass.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints

from amos_jax.model import ops


def _ref_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _ref_gelu(x):
  return 0.5 * x * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))


def _ref_dropout_attention(logits, v, mask, keep, keep_scale):
  probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
  probs = jnp.where(keep, probs * keep_scale, 0.0)
  return jnp.einsum("bnts,bsnd->btnd", probs, v)


def _check_grads(f, ref, *args):
  """Values and VJPs (with respect to every argument) of f and ref agree for a
  random cotangent."""
  y, vjp = jax.vjp(f, *args)
  y_ref, vjp_ref = jax.vjp(ref, *args)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(3), y.shape)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("d_in,d_out", [(16, 3), (3, 16)])
def test_dense_values_and_gradients_match_autodiff(with_bias, d_in, d_out):
  """The kernel gradient formed as X^T G (leading axes contracted), or on the CPU for
  a tall kernel as (G^T X)^T, is autodiff's."""
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 5, d_in))
  kernel = jax.random.normal(k[1], (d_in, d_out))
  if with_bias:
    bias = jax.random.normal(k[2], (d_out,))
    _check_grads(ops.dense, lambda x, w, b: x @ w + b, x, kernel, bias)
  else:
    _check_grads(lambda x, w: ops.dense(x, w, None), lambda x, w: x @ w, x, kernel)


def test_a_tall_kernel_gradient_is_formed_wide_on_the_cpu():
  """(K > N) -> the product with the wider output, kept apart from its transpose by a
  barrier (XLA would fold the transpose back); a wide one is X^T G as it is."""
  def text(d_in, d_out):
    x, kernel = jnp.ones((64, d_in)), jnp.ones((d_in, d_out))
    grad = jax.grad(lambda w: jnp.sum(ops.dense(x, w, None)))
    return jax.jit(grad).lower(kernel).as_text()
  assert jax.default_backend() == "cpu"
  assert "optimization_barrier" in text(32, 8)
  assert "optimization_barrier" not in text(8, 32)


def test_dense_shared_input_values_and_gradients_match_autodiff():
  """Query, key and value of one input: the input's gradient as one product over the
  stacked cotangents and kernels, and the kernels' and biases' gradients split from
  one product, are autodiff's of the separate layers."""
  k = jax.random.split(jax.random.key(4), 7)
  x = jax.random.normal(k[0], (2, 5, 16))
  kernels = tuple(jax.random.normal(k[1 + i], (16, 6)) for i in range(3))
  biases = tuple(jax.random.normal(k[4 + i], (w.shape[1],)) for i, w in enumerate(kernels))

  def ref(x, kernels, biases):
    return tuple(x @ w + b for w, b in zip(kernels, biases))

  ys, vjp = jax.vjp(ops.dense_shared_input, x, kernels, biases)
  ys_ref, vjp_ref = jax.vjp(ref, x, kernels, biases)
  for y, y_ref in zip(ys, ys_ref):
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  gs = tuple(jax.random.normal(jax.random.key(10 + i), y.shape) for i, y in enumerate(ys))
  for got, want in zip(jax.tree.leaves(vjp(gs)), jax.tree.leaves(vjp_ref(gs))):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_add_bias_values_and_gradients_match_autodiff():
  """The bias gradient formed as ones @ G (sum_rows) is the sum over all leading axes."""
  k = jax.random.split(jax.random.key(1), 2)
  y = jax.random.normal(k[0], (2, 5, 7))
  bias = jax.random.normal(k[1], (7,))
  _check_grads(ops.add_bias, lambda y, b: y + b, y, bias)


@pytest.mark.parametrize("implementation", ["xla", "native"])
def test_layer_norm_values_and_gradients_match_autodiff(implementation):
  """The jnp formulas and the CPU custom calls (tests/test_cpu_layer_norm.py)."""
  k = jax.random.split(jax.random.key(0), 3)
  x = 3.0 * jax.random.normal(k[0], (2, 5, 16)) + 1.5
  scale = 1.0 + 0.1 * jax.random.normal(k[1], (16,))
  bias = 0.1 * jax.random.normal(k[2], (16,))
  _check_grads(lambda x, s, b: ops.layer_norm(x, s, b, 1e-12, implementation),
               lambda x, s, b: _ref_layer_norm(x, s, b, 1e-12), x, scale, bias)


@pytest.mark.parametrize("implementation", ["xla", "native"])
def test_gelu_values_and_gradients_match_autodiff(implementation):
  """The jnp backward formula and the CPU custom call (tests/test_cpu_gelu.py)."""
  x = jnp.linspace(-6.0, 6.0, 241).reshape(1, 241)
  _check_grads(lambda x: ops.gelu(x, implementation), _ref_gelu, x)


@pytest.mark.parametrize("fully_masked_row", [False, True])
def test_dropout_attention_values_and_gradients_match_autodiff(fully_masked_row):
  b, n, t, d = 2, 3, 6, 4
  k = jax.random.split(jax.random.key(1), 4)
  logits = 2.0 * jax.random.normal(k[0], (b, n, t, t))
  v = jax.random.normal(k[1], (b, t, n, d))
  segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = (segments[:, None, :, None] == segments[:, None, None, :]) & (segments > 0)[
      :, None, None, :]
  if fully_masked_row:  # a query that attends to nothing: its logits get no gradient
    mask = mask.at[0, 0, 5].set(False)
  keep = jax.random.bernoulli(k[2], 0.8, (b, n, t, t))
  f = lambda lg, v: ops.dropout_attention(lg, v, mask, keep, 1.25)
  ref = lambda lg, v: _ref_dropout_attention(lg, v, mask, keep, 1.25)
  _check_grads(f, ref, logits, v)


def test_dropout_values_and_gradients_match_autodiff():
  k = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(k[0], (2, 7, 16))
  keep = jax.random.bernoulli(k[1], 0.7, x.shape)
  _check_grads(lambda x: ops.dropout(x, keep, 1 / 0.7),
               lambda x: jnp.where(keep, x / 0.7, 0.0), x)


def test_softmax_cross_entropy_values_and_gradients_match_autodiff():
  # The reference: optax's integer-label cross-entropy, differentiated by JAX.
  import optax
  k = jax.random.split(jax.random.key(4), 2)
  logits = 5.0 * jax.random.normal(k[0], (3, 4, 37))
  labels = jax.random.randint(k[1], (3, 4), 0, 37)
  _check_grads(lambda lg: ops.softmax_cross_entropy(lg, labels),
               lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels), logits)
  big = logits.at[0, 0, 3].set(1e4)  # one huge logit: no overflow, gradient still exact
  _check_grads(lambda lg: ops.softmax_cross_entropy(lg, labels),
               lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels), big)
  # bfloat16 logits: a float32 loss, a gradient in the logits' own dtype.
  half = logits.astype(jnp.bfloat16)
  nll, vjp = jax.vjp(lambda lg: ops.softmax_cross_entropy(lg, labels), half)
  assert nll.dtype == jnp.float32 and vjp(jnp.ones_like(nll))[0].dtype == jnp.bfloat16


def _residual_bytes(f, *args):
  total = 0
  for aval, _ in saved_residuals(f, *args):
    total += math.prod(aval.shape) * aval.dtype.itemsize
  return total


def test_ops_keep_fewer_residuals_than_autodiff_of_the_formulas():
  b, n, t, d = 2, 4, 32, 16
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (b, t, n * d))
  scale, bias = jnp.ones(n * d), jnp.zeros(n * d)
  assert (_residual_bytes(lambda x: ops.layer_norm(x, scale, bias, 1e-12), x)
          < _residual_bytes(lambda x: _ref_layer_norm(x, scale, bias, 1e-12), x))
  assert _residual_bytes(ops.gelu, x) <= x.size * 4  # the input only
  logits = jax.random.normal(k[1], (b, n, t, t))
  v = jax.random.normal(k[2], (b, t, n, d))
  mask = jnp.ones((b, 1, t, t), bool)
  keep = jnp.ones((b, n, t, t), bool)
  keep_x = jax.random.bernoulli(k[0], 0.9, x.shape)
  assert _residual_bytes(lambda x: ops.dropout(x, keep_x, 1 / 0.9), x) == x.size  # the mask
  # One float (B, N, T, T) array (the probabilities), not three.
  got = _residual_bytes(lambda lg: ops.dropout_attention(lg, v, mask, keep, 1.25), logits)
  assert got < 2 * logits.size * 4, got
