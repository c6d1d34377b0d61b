"""Multi-head self-attention through `jax.nn.dot_product_attention`.

The backend is chosen by config (`model.attention_impl`): 'xla' (every backend),
'cudnn' (cuDNN's fused kernel, NVIDIA GPUs, bfloat16/float16) or 'auto' (cuDNN where
it applies, else XLA). Where cuDNN cannot run (another backend, float32, a head
width it lacks) 'cudnn' falls back to XLA with one warning. The packed-document
mask is passed on every path. Attention-probability dropout has no fused form, so
when it is active (training with `attention_dropout > 0`) the probabilities are
computed explicitly.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from amos_jax.model import ops
from amos_jax.model import rng as rng_lib

log = logging.getLogger("amos_jax")


def _cudnn_unavailable(dtype, head_dim: int, platform: str) -> str:
  """Why cuDNN's fused attention cannot run here ('' when it can)."""
  if platform != "gpu":
    return f"the {platform} backend has no cuDNN"
  if not any("nvidia" in d.device_kind.lower() for d in jax.devices("gpu")):
    return "no NVIDIA GPU"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention needs bfloat16 or float16, not {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 256:
    return f"cuDNN attention needs a head width that is a multiple of 8 up to 256, not {head_dim}"
  return ""


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  log.warning(message)


def resolve_implementation(implementation: str | None, dtype, head_dim: int,
                           platform: str | None = None) -> str:
  """'auto' | 'xla' | 'cudnn' (None: 'auto') -> the implementation that will run."""
  implementation = implementation or "auto"
  if implementation == "xla":
    return "xla"
  if implementation not in ("auto", "cudnn"):
    raise ValueError(f"attention_impl={implementation!r}: use auto, xla or cudnn")
  why = _cudnn_unavailable(dtype, head_dim, platform or jax.default_backend())
  if not why:
    return "cudnn"
  if implementation == "cudnn":
    _warn_once(f"model.attention_impl=cudnn: {why}; using XLA attention")
  return "xla"


def segment_attention_mask(segment_ids: jax.Array) -> jax.Array:
  """(B, T) segment ids (0 = padding) -> (B, 1, T, T) bool: attend within a segment.

  Packed rows hold several documents; attention never crosses a document boundary.
  Padding queries attend to nothing real, so they are given themselves (no NaNs).
  """
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  real = (segment_ids > 0)[:, None, None, :]
  eye = jnp.eye(segment_ids.shape[1], dtype=bool)[None, None]
  return (same & real) | (eye & (segment_ids == 0)[:, None, :, None])


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> jax.Array:
  """T5-style bidirectional buckets of (key - query) offsets: (q_len, k_len) int32."""
  rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
  half = num_buckets // 2
  bucket = (rel > 0).astype(jnp.int32) * half
  n = jnp.abs(rel)
  max_exact = half // 2
  is_small = n < max_exact
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact)
      * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(is_small, n, large)


def dot_product_attention(q, k, v, mask, bias=None, *, dropout_rate=0.0,
                          dropout_rng=None, implementation=None):
  """q, k, v: (B, T, N, Dh); mask: (B, 1, T, T) bool; bias: (1|B, N, T, T) -> (B, T, N, Dh)."""
  if dropout_rng is not None and dropout_rate > 0.0:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btnd,bsnd->bnts", q, k).astype(jnp.float32) * scale
    if bias is not None:
      logits = logits + bias
    keep, keep_scale = rng_lib.dropout_keep(dropout_rng, dropout_rate, logits.shape)
    return ops.dropout_attention(logits, v, mask, keep, keep_scale)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask,
      implementation=resolve_implementation(implementation, q.dtype, q.shape[-1]))
