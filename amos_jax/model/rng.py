"""Random keys that are one key, or one key per example (shape (B,)).

With a key per example, the masks, samples and dropout of a row depend on that
row's key alone: a micro-batch draws exactly what the whole batch draws for its
rows, so gradient accumulation equals one step on the whole batch.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from amos_jax.config import DROPOUT_IMPLS
from amos_jax.model import native_lib

log = logging.getLogger("amos_jax")


def _is_batched(rng: jax.Array) -> bool:
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return rng.ndim > (0 if typed else 1)


def per_row(key: jax.Array, row_ids: jax.Array) -> jax.Array:
  """One key per example: fold_in(key, global row index). row_ids: (B,) -> (B,) keys."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(row_ids)


def split(rng: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """n independent keys (each per row when `rng` is per row)."""
  if not _is_batched(rng):
    return tuple(jax.random.split(rng, n))
  keys = jax.vmap(lambda k: jax.random.split(k, n))(rng)
  return tuple(keys[:, i] for i in range(n))


def draw(sampler: Callable[[jax.Array, tuple], jax.Array], rng: jax.Array,
         shape: Sequence[int]) -> jax.Array:
  """sampler(key, shape); with per-row keys, row i is sampler(rng[i], shape[1:])."""
  shape = tuple(shape)
  if not _is_batched(rng):
    return sampler(rng, shape)
  # vmap over threefry keys gives each row what its key alone gives; the
  # RngBitGenerator-based 'rbg' and 'unsafe_rbg' batch their bits differently under
  # vmap, so they draw row by row.
  if is_threefry(rng):
    return jax.vmap(lambda k: sampler(k, shape[1:]))(rng)
  return jax.lax.map(lambda k: sampler(k, shape[1:]), rng)


# Threefry-2x32 (Salmon et al., SC 2011; 20 rounds), the hash behind JAX's default
# keys. JAX lowers it on CPU as a rolled 5-iteration loop, which copies its state
# every iteration and keeps it out of the consumer's fusion: that loop was most of
# dropout's cost on CPU. Written out here, XLA fuses the whole hash into the kernel
# that uses the bits. The same function as JAX's (tested bit for bit).
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
  """Threefry-2x32 of the counter pairs (x1, x2) under the key (k1, k2). All uint32."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = _rotl(x2, r) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def is_threefry(key: jax.Array) -> bool:
  """Whether `key` (one key or a batch of them) is threefry: typed with that
  generator, or raw uint32 pairs (a raw rbg key is uint32[4])."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return "threefry" in str(jax.random.key_impl(key))
  return key.shape[-1:] == (2,)


def bits_2x32(key: jax.Array, shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Both uint32 words of the threefry hash of counters 0..prod(shape)-1 (row-major).

  The counters JAX's partitionable threefry uses: `jax.random.bits(key, shape)` is
  w1 ^ w2, and `jax.random.split(key, n)` holds (w1, w2) of counters 0..n-1.
  Here both words are kept: 64 random bits per hash.
  """
  shape = tuple(shape)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  k1, k2 = key[0], key[1]
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2 ** 32:
    raise ValueError(f"bits_2x32: {size} counters exceed 2^32; draw in parts")
  lo = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return threefry2x32(k1, k2, jnp.zeros_like(lo), lo)


def uniform(key: jax.Array, shape: Sequence[int], minval: float = 0.0,
            maxval: float = 1.0) -> jax.Array:
  """float32 uniforms in [minval, maxval): `jax.random.uniform`'s values bit for bit
  with a threefry key (23 random mantissa bits of w1 ^ w2), from the written-out
  hash so that XLA fuses it into the consumer. Other generators: JAX's own."""
  shape = tuple(shape)
  if not is_threefry(key):
    return jax.random.uniform(key, shape, jnp.float32, minval, maxval)
  w1, w2 = bits_2x32(key, shape)
  one = np.float32(1.0).view(np.uint32)
  floats = jax.lax.bitcast_convert_type(((w1 ^ w2) >> np.uint32(9)) | one, jnp.float32) - 1.0
  lo, hi = np.float32(minval), np.float32(maxval)
  return jnp.maximum(lo, floats * (hi - lo) + lo)


DROPOUT_KEEP = "dropout_keep"  # the name of every dropout mask (see dropout_keep)


def _keep_bits(key: jax.Array, shape: tuple, threshold: int) -> jax.Array:
  """Bernoulli(threshold / 2^16) from the 16-bit quarters of 64-bit hashes.

  With a threefry key, one hash gives four decisions (both words, two halves
  each); with another generator, 32-bit words from `jax.random.bits` give two.
  """
  n = shape[-1]
  if is_threefry(key):
    w1, w2 = bits_2x32(key, shape[:-1] + ((n + 3) // 4,))
    parts = (w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16)
  else:
    words = jax.random.bits(key, shape[:-1] + ((n + 1) // 2,), jnp.uint32)
    parts = (words & 0xFFFF, words >> 16)
  return jnp.concatenate(parts, axis=-1)[..., :n] < threshold


NATIVE_KEEP = "amos_dropout_keep"  # the FFI target of native/dropout_keep.cc


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
  """Logs `message` as a warning the first time only (a fallback chosen at trace
  time is traced again for every program)."""
  log.warning(message)


def resolve_dropout_impl(implementation: str | None, rng: jax.Array, platform: str | None = None,
                         mesh=None) -> str:
  """'auto' | 'xla' | 'native' (None: 'auto') -> the one that will draw the masks.
  platform and mesh default to the current abstract mesh's (the backend's outside
  a mesh), as attention's choice.

  'native' hashes the same threefry counters as 'xla' in a CPU custom call
  (`native/dropout_keep.cc`): equal masks, 3-11x as fast as XLA's fusion alone. It
  needs a threefry key, the CPU, a program XLA does not partition itself
  (`partitioning.custom_call_partitioned`) and the library built; where an explicit
  'native' cannot run, XLA's form draws them, with one warning.
  """
  why_not = "" if is_threefry(rng) else (
      "the native masks hash threefry keys, not train.rng_impl's")
  return native_lib.resolve("model.dropout_impl", implementation, DROPOUT_IMPLS,
                            what="the native mask kernel", fallback="XLA's dropout masks",
                            platform=platform, mesh=mesh, why_not=why_not)


def threefry_words(rng: jax.Array) -> jax.Array:
  """One threefry key, or one per row (typed or raw), as (1|B, 2) uint32: what the
  native custom calls hash with."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return rng.reshape(-1, 2).astype(jnp.uint32)


def _native_keep(rng: jax.Array, shape: tuple, threshold: int) -> jax.Array:
  """_keep_bits' masks for one key (shape) or a key per row (shape[0] rows), drawn
  in the custom call."""
  native_lib.load()  # built and registered (RuntimeError saying why not)
  return jax.ffi.ffi_call(NATIVE_KEEP, jax.ShapeDtypeStruct(shape, jnp.bool_),
                          vmap_method="sequential")(
      threefry_words(rng), n=np.int64(shape[-1]), threshold=np.int64(threshold))


def keep_counters(row_shape: Sequence[int]) -> int:
  """The threefry counters one key's keep mask of `row_shape` hashes (four decisions
  each along the last axis); the native kernels number them in uint32, so they run
  below 2^32."""
  return int(np.prod(row_shape[:-1], dtype=np.int64)) * ((row_shape[-1] + 3) // 4)


def keep_threshold(rate: float) -> int:
  """Dropout at `rate` keeps a position where its 16 random bits are below this."""
  threshold = int(round((1.0 - rate) * 65536))
  if not 0 < threshold < 65536:
    raise ValueError(f"dropout rate {rate} must be in (0, 1)")
  return threshold


def dropout_keep(rng: jax.Array, rate: float, shape: Sequence[int],
                 implementation: str | None = None):
  """(keep mask of `shape`, 1 / keep probability) for dropout at `rate`.

  Each kept/dropped decision uses 16 random bits against an integer threshold,
  instead of a float32 uniform per element: a quarter of the hashes with threefry
  keys. The keep probability is round((1 - rate) * 2^16) / 2^16 (within 1e-5 of
  1 - rate) and the scale is its exact inverse, so the expectation is unchanged.
  implementation (`model.dropout_impl`, see resolve_dropout_impl) changes where
  the bits are computed, never which.
  """
  shape = tuple(shape)
  threshold = keep_threshold(rate)
  row_shape = shape[1:] if _is_batched(rng) else shape
  if (row_shape and 0 not in shape and keep_counters(row_shape) < 2 ** 32
      and resolve_dropout_impl(implementation, rng) == "native"):
    keep = _native_keep(rng, shape, threshold)
  else:
    keep = draw(lambda k, s: _keep_bits(k, s, threshold), rng, shape)
  # Named so that a remat policy can keep the mask (1 byte per element) instead of
  # hashing its bits again in the backward pass (encoder._checkpointed).
  return checkpoint_name(keep, DROPOUT_KEEP), 65536.0 / threshold
