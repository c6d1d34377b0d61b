"""Attention's core fused in one CPU custom call: `attention(q, k, v, mask, ...)`.

softmax(where(mask, scale * q k^T, lowest)), dropped with the masks
`rng.dropout_keep` draws for its (B, N, T, S) shape, times v, per (batch, head) in
one work item whose T x S tile stays in the core's cache (`native/attention.cc`):
no (B, N, T, S) logits, probabilities or masks are written to memory, and the
backward pass (a second custom call) computes the tile again from q and k, as flash
attention does, from the softmax statistics (each row's max and 1 / sum, (B, N, T,
2)) the forward pass keeps. Its products are `cpu_matmul`'s kernel. float32 on the
CPU; q (B, T, N, Dh), k and v (B, S, N, Dh), mask bool (1|B, 1, T, S).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from amos_jax.model import native_lib
from amos_jax.model import rng as rng_lib

FORWARD, BACKWARD = "amos_attention_fwd", "amos_attention_bwd"
# The name of the softmax statistics, a residual remat policies keep (B*N*T*2 floats,
# where computing them again means running the forward call again).
SOFTMAX_STATS = "softmax_stats"


def isa() -> str:
  """The kernel this CPU runs: 'avx512', 'avx2' or 'generic' ('' if unavailable)."""
  return native_lib.isa("amos_attention")


def key_words(rng: jax.Array | None) -> jax.Array:
  """A threefry key, or one per row, as (1|B, 2) uint32 (zeros without dropout)."""
  return jnp.zeros((1, 2), jnp.uint32) if rng is None else rng_lib.threefry_words(rng)


def _attrs(scale, threshold):
  return dict(scale=np.float32(scale), threshold=np.int64(threshold or 0),
              dropout=np.int64(threshold is not None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q, k, v, mask, keys, scale: float, threshold: int | None) -> jax.Array:
  """(B, T, N, Dh) context. keys: `key_words(dropout_rng)`; threshold: dropout keeps a
  position where its 16 random bits are below it (`rng.dropout_keep`), None for no
  dropout. Differentiable in q, k and v."""
  return _forward(q, k, v, mask, keys, scale, threshold)[0]


def _forward(q, k, v, mask, keys, scale, threshold):
  """The context (B, T, N, Dh) and the softmax statistics (B, N, T, 2)."""
  native_lib.load()  # built and registered (RuntimeError saying why not)
  b, t, n, _ = q.shape
  return jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                    jax.ShapeDtypeStruct((b, n, t, 2), jnp.float32)),
                          vmap_method="sequential")(
      q, k, v, mask, keys, **_attrs(scale, threshold))


def _attention_fwd(q, k, v, mask, keys, scale, threshold):
  ctx, stats = _forward(q, k, v, mask, keys, scale, threshold)
  return ctx, (q, k, v, mask, keys, checkpoint_name(stats, SOFTMAX_STATS))


def _attention_bwd(scale, threshold, residuals, g):
  q, k, v, mask, keys, stats = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      BACKWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct(k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, jnp.float32)),
      vmap_method="sequential")(q, k, v, mask, keys, stats, g.astype(jnp.float32),
                                **_attrs(scale, threshold))
  return dq, dk, dv, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
