"""Encoder and loss ops with hand-written backward passes that keep few residuals.

Differentiated as plain jnp, LayerNorm keeps six arrays per call for the backward
pass, exact GELU four (B, T, 4H) arrays, softmax + dropout + the product with V
five (B, N, T, T) arrays, and dropout its output besides the mask. Each op here
keeps only what its gradient needs: LayerNorm the normalized input and 1/std, GELU
its input, attention the probabilities, the dropout mask and V, dropout the mask.
Under `lax.scan` every residual is written to a stacked (L, ...) buffer and read
back in the backward pass, so fewer residuals means less memory traffic on every
backend and less activation memory per chip. The forward values are the same
formulas; the gradients are the analytic ones (tested against autodiff of the plain
formulas in tests/test_ops.py). `softmax_cross_entropy` (the MLM heads' loss) is
here for its one-pass backward rather than its residuals, `dense` for the order of
its kernel gradient's product, `dense_shared_input` for one backward product where
several layers read one input, and `sum_rows` / `add_bias` for the form of the dense
and MLM-head bias gradients (a product with ones, not a row reduction, which is slow
at vocabulary width on XLA's CPU backend; LayerNorm's H-wide sums stay reductions).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from amos_jax.model import cpu_gelu, cpu_layer_norm, cpu_matmul
from amos_jax.model.partitioning import mesh_platform

_F32 = jnp.float32


DENSE_OUT = "dense_out"  # the name of every dense output: what remat saves of it


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """x @ kernel + bias: (..., K), (K, N), (N,) or None -> (..., N).

  The backward pass forms the kernel's gradient as X^T G, x and g flattened to
  (tokens, K) and (tokens, N), in the kernel's own (K, N) order. JAX's transpose of
  the product forms (G^T X)^T instead, and XLA's CPU backend turns that into a
  transposed copy of G and a product of two transposed operands that runs at about
  half the speed of the others (benchmarks/matmul_floor.py). Hidden in a custom_vjp,
  the product is no longer a `dot_general` that remat's dots_saveable would keep, so
  the output is named (DENSE_OUT, by the caller) and the encoder's policy keeps it.
  """
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y if bias is None else y + bias


def _dense_fwd(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel, bias is None)


def _dense_bwd(res, g):
  x, kernel, no_bias = res
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  # As (tokens, K) and (tokens, N) matrices: contracted over all leading axes at
  # once, XLA transposes x first, which costs more than it saves when unrolled.
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dbias = None if no_bias else sum_rows(g2)
  return dx, kernel_gradient(x2, g2).astype(kernel.dtype), dbias


def kernel_gradient(x2: jax.Array, g2: jax.Array) -> jax.Array:
  """X^T G: (tokens, K), (tokens, N) -> (K, N), a dense kernel's gradient.

  On the CPU a tall one (K > N) is formed as (G^T X)^T: XLA's CPU backend runs the
  product with the wider output 1.5-1.7x as fast (an FFN's 1024 x 256 output over
  4,096 tokens: 6.4 against 9.7 ms on 2 cores), and the transpose of the (K, N)
  result costs a fraction of a millisecond. The barrier keeps XLA from folding the
  transpose back into the product.
  """
  contract = (((0,), (0,)), ((), ()))
  if x2.shape[1] > g2.shape[1] and mesh_platform() == "cpu":
    return jax.lax.optimization_barrier(jax.lax.dot_general(g2, x2, contract)).T
  return jax.lax.dot_general(x2, g2, contract)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def dense_shared_input(x: jax.Array, kernels: tuple, biases: tuple) -> tuple:
  """(x @ kernel_i + bias_i for each i): (..., K), ((K, N),) * L, ((N,),) * L ->
  ((..., N),) * L.

  Dense layers of one input (attention's query, key and value). The forward pass is
  `dense` per layer; the backward pass forms the input's gradient as one product,
  stack(G_i) @ stack(kernel_i)^T contracted over (L, N), and the kernels' gradients
  as one X^T stack(G_i), split after. Three thin products and a pass adding their
  outputs took about 4% of the ELECTRA-small CPU step more (BENCHMARKS.md). Stacked
  on a new axis, not concatenated, so a kernel sharded over its N axis stays so.
  """
  return tuple(dense(x, w, b) for w, b in zip(kernels, biases))


def _shared_fwd(x, kernels, biases):
  return dense_shared_input(x, kernels, biases), (x, kernels)


def _shared_bwd(res, gs):
  x, kernels = res
  g = jnp.stack(gs, axis=-2)                                         # (..., L, N)
  w = jnp.stack(kernels, axis=-2)                                    # (K, L, N)
  dx = jax.lax.dot_general(g, w, (((g.ndim - 2, g.ndim - 1), (1, 2)), ((), ())))
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, *g.shape[-2:])
  dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))         # (K, L, N)
  db = sum_rows(g2.reshape(g2.shape[0], -1)).reshape(g2.shape[1:])   # (L, N)
  return (dx, tuple(dw[:, i].astype(k.dtype) for i, k in enumerate(kernels)),
          tuple(db[i] for i in range(len(kernels))))


dense_shared_input.defvjp(_shared_fwd, _shared_bwd)


def sum_rows(g2: jax.Array) -> jax.Array:
  """Column sums of a (rows, N) matrix -> (N,) in g2.dtype (float32 accumulation).

  Formed as the product ones(rows) @ g2, not `jnp.sum(g2, axis=0)`: a bias gradient
  is this sum, and XLA's CPU backend reduces a (640, 30522) MLM-logits gradient over
  its rows in about 100 ms, where the product takes under 3 ms; at the encoder's
  widths both take under 1 ms.
  """
  ones = jnp.ones((g2.shape[0],), g2.dtype)
  return jax.lax.dot_general(ones, g2, (((0,), (0,)), ((), ())),
                             preferred_element_type=_F32).astype(g2.dtype)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias: (..., N), (N,) -> (..., N); the bias gradient through `sum_rows`."""
  return y + bias


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  return g, sum_rows(g.reshape(-1, g.shape[-1])).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               implementation: str | None = None) -> jax.Array:
  """LayerNorm over the last axis: (..., H), scale (H,), bias (H,) -> (..., H) in x.dtype.

  Statistics in float32 (two-pass variance), as BERT's LayerNorm. implementation
  (`model.layer_norm_impl`, cpu_layer_norm.resolve_layer_norm_impl): the CPU custom
  calls (`cpu_layer_norm.layer_norm`, float32) or these jnp formulas.
  """
  if cpu_layer_norm.resolve_layer_norm_impl(implementation, x.dtype) == "native":
    return cpu_layer_norm.layer_norm(x, scale, bias, eps)
  return _layer_norm(x, scale, bias, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xf = x.astype(_F32)
  centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
  xhat = centered * rstd
  y = xhat * scale.astype(_F32) + bias.astype(_F32)
  return y.astype(x.dtype), (xhat, rstd, scale, bias)


def _layer_norm_bwd(eps, res, g):
  del eps
  xhat, rstd, scale, bias = res
  gf = g.astype(_F32)
  reduce_axes = tuple(range(gf.ndim - 1))
  dbias = jnp.sum(gf, axis=reduce_axes)
  dscale = jnp.sum(gf * xhat, axis=reduce_axes)
  dxhat = gf * scale.astype(_F32)
  dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
               - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(g.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _normal_cdf(xf: jax.Array) -> jax.Array:
  """Phi(x) = (1 + erf(x / sqrt 2)) / 2 in float32.

  Through erf, as torch's GELU, not erfc as `jax.nn.gelu(approximate=False)`: XLA
  expands erfc into two rational approximations, an exp and a division, all
  evaluated and one selected, which made the forward GELU and its recomputation
  in the backward pass 2.3x slower elementwise on CPU. GELU through either form
  is within 1.1e-6 absolute of float64 over [-12, 12]; erf keeps less relative
  precision only where GELU is tiny (1 + erf cancels: 5e-5 relative at x = -3).
  """
  return 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, implementation: str | None = None) -> jax.Array:
  """Exact (erf) GELU, x * Phi(x), as BERT and ELECTRA use. Any shape, x.dtype out;
  computed in float32. implementation (`model.gelu_impl`,
  cpu_gelu.resolve_gelu_impl): where the backward pass runs."""
  xf = x.astype(_F32)
  return (xf * _normal_cdf(xf)).astype(x.dtype)


def _gelu_fwd(x, implementation):
  return gelu(x, implementation), x


def _gelu_bwd(implementation, x, g):
  if cpu_gelu.resolve_gelu_impl(implementation, x.dtype) == "native":
    return (cpu_gelu.backward(x, g).astype(x.dtype),)
  xf = x.astype(_F32)
  pdf = jnp.exp(-0.5 * jnp.square(xf)) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(_F32) * (_normal_cdf(xf) + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dropout(x: jax.Array, keep: jax.Array, keep_scale: float) -> jax.Array:
  """Inverted dropout: x * keep_scale where keep, else 0; keep: bool, x's shape.

  Keeps only the mask. Differentiated as `jnp.where`, JAX saves the output (or,
  as `lax.select`, a zeros array) too: one more activation-sized residual per call.
  """
  return jnp.where(keep, x * keep_scale, 0).astype(x.dtype)


def _dropout_fwd(x, keep, keep_scale):
  return dropout(x, keep, keep_scale), keep


def _dropout_bwd(keep_scale, keep, g):
  return jnp.where(keep, g * keep_scale, 0).astype(g.dtype), None


dropout.defvjp(_dropout_fwd, _dropout_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def dropout_attention(logits: jax.Array, v: jax.Array, mask: jax.Array, keep: jax.Array,
                      keep_scale: float, gemm: bool = False) -> jax.Array:
  """softmax(logits masked) -> dropout -> @ V, with one saved (B, N, T, S) array.

  logits: (B, N, T, S) float32 (scaled, bias added); v: (B, S, N, Dh);
  mask: bool, broadcastable to logits (False = not attended);
  keep: bool (B, N, T, S) dropout keep mask; keep_scale: 1 / keep probability;
  gemm: the products through `cpu_matmul.einsum` (float32 on the CPU).
  Returns (B, T, N, Dh) in v.dtype.
  """
  return _dropout_attention_fwd(logits, v, mask, keep, keep_scale, gemm)[0]


def _dropped(probs, keep, keep_scale, dtype):
  return jnp.where(keep, probs * keep_scale, 0.0).astype(dtype)


def _attention_einsum(gemm: bool):
  return cpu_matmul.einsum if gemm else jnp.einsum


def _dropout_attention_fwd(logits, v, mask, keep, keep_scale, gemm):
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(_F32).min), axis=-1)
  ctx = _attention_einsum(gemm)(
      "bnts,bsnd->btnd", _dropped(probs, keep, keep_scale, v.dtype), v)
  return ctx, (probs, v, mask, keep)


def _dropout_attention_bwd(keep_scale, gemm, res, g):
  probs, v, mask, keep = res
  einsum = _attention_einsum(gemm)
  dv = einsum("bnts,btnd->bsnd", _dropped(probs, keep, keep_scale, v.dtype), g)
  dprobs = einsum("btnd,bsnd->bnts", g, v).astype(_F32)
  dprobs = jnp.where(keep, dprobs * keep_scale, 0.0)
  dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
  # Masked logits were replaced by a constant: no gradient reaches them.
  dlogits = jnp.where(mask, dlogits, 0.0)
  return dlogits, dv, None, None


dropout_attention.defvjp(_dropout_attention_fwd, _dropout_attention_bwd)


@jax.custom_vjp
def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(logits)[label]: (..., V) float, (...) int -> (...) float32.

  The backward pass is softmax - one_hot(label) in one elementwise pass, from the
  logits and the log-partition. Differentiated as `log_softmax` + `take_along_axis`,
  the gradient is scattered into a zero-filled (..., V) array and passed through
  log_softmax's backward; at a 30k vocabulary that is several full passes more
  per MLM head.
  """
  return _softmax_cross_entropy_fwd(logits, labels)[0]


def _log_partition(logits):
  m = jnp.max(logits, axis=-1, keepdims=True)
  return (m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)))[..., 0]


def _softmax_cross_entropy_fwd(logits, labels):
  x = logits.astype(_F32)
  lse = _log_partition(x)
  picked = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, labels, lse)


def _softmax_cross_entropy_bwd(res, g):
  logits, labels, lse = res
  x = logits.astype(_F32)
  word = jax.lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1)
  dlogits = (jnp.exp(x - lse[..., None]) - (word == labels[..., None])) * g[..., None]
  return dlogits.astype(logits.dtype), None


softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)
