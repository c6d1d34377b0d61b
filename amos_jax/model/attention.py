"""Multi-head self-attention: XLA's, cuDNN's fused kernel, or our CPU kernels.

The backend is chosen by config (`model.attention_impl`):
- 'xla': `jax.nn.dot_product_attention`'s XLA form, every backend;
- 'cudnn': cuDNN's fused kernel (NVIDIA GPUs, bfloat16/float16);
- 'gemm': the two batched products through `cpu_matmul.einsum` (float32 on the CPU,
  the batch shared among the cores), softmax and masks as XLA's form computes them;
- 'fused': scores, mask, softmax, dropout and context per (batch, head) in one CPU
  custom call (`cpu_attention`), the backward pass another: no (B, N, T, S) array
  is written to memory. It has no form for an attention bias (relative positions)
  or dropout keys of another generator than threefry; there gemm runs instead;
- 'auto' (the default): cuDNN where it applies, else fused (or gemm) where it
  applies, else XLA.
Where the chosen one cannot run, it falls back to XLA with one warning. The CPU
kernels need the CPU, float32, a C++ compiler for their first build, and a step XLA
does not partition itself: under a mesh with an automatically sharded axis of more
than one device, or outside a mesh on several devices (arguments' shardings can
partition the program there), XLA would see a custom call it cannot split (inside
`shard_map`, where each device computes its own block, it runs). The
packed-document mask is passed on every path. With attention-probability dropout
(training with `attention_dropout > 0`) the XLA and gemm forms compute the
probabilities explicitly (`ops.dropout_attention`); fused draws the same masks
(`rng.dropout_keep`'s bits) inside its kernel.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from amos_jax.config import ATTENTION_IMPLS
from amos_jax.model import cpu_attention, cpu_matmul, native_lib, ops
from amos_jax.model import rng as rng_lib
from amos_jax.model.partitioning import mesh_platform

# The name of gemm attention's logits and context for remat policies: custom-call
# outputs, which `dots_saveable` does not see as products and would recompute.
ATTENTION_PRODUCT = "attention_product"


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


def resolve_implementation(implementation: str | None, dtype, head_dim: int,
                           platform: str | None = None, mesh=None) -> str:
  """'auto' | 'xla' | 'cudnn' | 'gemm' (None: 'auto') -> the implementation that will
  run. platform and mesh default to the current abstract mesh's (the backend's
  outside a mesh)."""
  implementation = implementation or "auto"
  if implementation == "xla":
    return "xla"
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={implementation!r}: use one of {ATTENTION_IMPLS}")
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  platform = platform or mesh_platform(mesh)
  if implementation in ("auto", "cudnn"):
    why = _cudnn_unavailable(dtype, head_dim, platform)
    if not why:
      return "cudnn"
    if implementation == "cudnn":
      rng_lib.warn_once(f"model.attention_impl=cudnn: {why}; using XLA attention")
      return "xla"
  why = native_lib.cpu_kernel_unavailable("the CPU attention kernels", dtype, platform,
                                          mesh)
  failed = ""
  if not why:
    failed = cpu_matmul.unavailable_reason()
    if not failed:
      return "gemm" if implementation == "gemm" else "fused"
    why = f"the CPU custom calls did not build ({failed})"
  # 'auto' says nothing where the CPU kernels do not apply by design (another
  # backend, another dtype, a partitioned mesh), only where they should have run and
  # could not.
  if implementation in ("gemm", "fused") or failed:
    rng_lib.warn_once(f"model.attention_impl={implementation}: {why}; using XLA attention")
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


def _fused_has_no_form(q, k, mask, bias, dropout_rng) -> str:
  """What of this call the fused kernel cannot compute ('' when it can)."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  if bias is not None:
    return "an attention bias (relative positions)"
  if tuple(mask.shape) not in ((b, 1, t, s), (1, 1, t, s)):
    return f"a mask of shape {tuple(mask.shape)}"
  if dropout_rng is not None and not rng_lib.is_threefry(dropout_rng):
    return "dropout keys of another generator than threefry"
  if rng_lib.keep_counters((n, t, s)) >= 2 ** 32:
    return "2^32 or more dropout counters per row"
  return ""


def dot_product_attention(q, k, v, mask, bias=None, *, dropout_rate=0.0,
                          dropout_rng=None, implementation=None, dropout_impl=None):
  """q, k, v: (B, T, N, Dh); mask: (B, 1, T, T) bool; bias: (1|B, N, T, T) -> (B, T, N, Dh)."""
  requested = implementation
  implementation = resolve_implementation(implementation, q.dtype, q.shape[-1])
  dropout = dropout_rng is not None and dropout_rate > 0.0
  scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation == "fused":
    why = _fused_has_no_form(q, k, mask, bias, dropout_rng if dropout else None)
    if not why:
      threshold = rng_lib.keep_threshold(dropout_rate) if dropout else None
      ctx = cpu_attention.attention(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
          mask.astype(bool),
          cpu_attention.key_words(dropout_rng if dropout else None), scale, threshold)
      return checkpoint_name(ctx.astype(v.dtype), ATTENTION_PRODUCT)
    if requested == "fused":
      rng_lib.warn_once(f"model.attention_impl=fused: the fused kernel has no form for "
                        f"{why}; running its products in the gemm kernel")
    implementation = "gemm"
  gemm = implementation == "gemm"
  if gemm:
    einsum = lambda spec, x, y: checkpoint_name(cpu_matmul.einsum(spec, x, y),
                                                ATTENTION_PRODUCT)
  else:
    einsum = jnp.einsum
  if dropout:
    logits = einsum("btnd,bsnd->bnts", q, k).astype(jnp.float32) * scale
    if bias is not None:
      logits = logits + bias
    keep, keep_scale = rng_lib.dropout_keep(dropout_rng, dropout_rate, logits.shape,
                                            dropout_impl)
    ctx = ops.dropout_attention(logits, v, mask, keep, keep_scale, gemm)
    return checkpoint_name(ctx, ATTENTION_PRODUCT) if gemm else ctx
  if gemm:
    # jax.nn.dot_product_attention's XLA form, with the products in the kernel.
    logits = einsum("btnd,bsnd->bnts", q, k) * scale
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), v)
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, implementation=implementation)
