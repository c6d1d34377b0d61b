"""Random keys that are one key, or one key per example (shape (B,)).

With a key per example, the masks, samples and dropout of a row depend on that
row's key alone: a micro-batch draws exactly what the whole batch draws for its
rows, so gradient accumulation equals one step on the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


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


def _vmap_is_exact(rng: jax.Array) -> bool:
  """Whether vmapping a draw over keys gives each row what its key alone gives.

  True for threefry (and raw uint32 keys); the RngBitGenerator-based 'rbg' and
  'unsafe_rbg' batch their bits differently under vmap, so they draw row by row.
  """
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return True
  return "rbg" not in str(jax.random.key_impl(rng))


def draw(sampler: Callable[[jax.Array, tuple], jax.Array], rng: jax.Array,
         shape: Sequence[int]) -> jax.Array:
  """sampler(key, shape); with per-row keys, row i is sampler(rng[i], shape[1:])."""
  shape = tuple(shape)
  if not _is_batched(rng):
    return sampler(rng, shape)
  if _vmap_is_exact(rng):
    return jax.vmap(lambda k: sampler(k, shape[1:]))(rng)
  return jax.lax.map(lambda k: sampler(k, shape[1:]), rng)


def _keep_bits(key: jax.Array, shape: tuple, threshold: int) -> jax.Array:
  """Bernoulli(threshold / 2^16) from 16-bit halves of 32-bit random words."""
  n = shape[-1]
  words = jax.random.bits(key, shape[:-1] + ((n + 1) // 2,), jnp.uint32)
  halves = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :n]
  return halves < threshold


def dropout_keep(rng: jax.Array, rate: float, shape: Sequence[int]):
  """(keep mask of `shape`, 1 / keep probability) for dropout at `rate`.

  Each kept/dropped decision uses 16 random bits (two per 32-bit word) against an
  integer threshold, instead of a float32 uniform per element: a quarter to a
  fifth of the bit-generation work on CPU, where threefry dominates dropout's
  cost. The keep probability is round((1 - rate) * 2^16) / 2^16 (within 1e-5 of
  1 - rate) and the scale is its exact inverse, so the expectation is unchanged.
  """
  threshold = int(round((1.0 - rate) * 65536))
  if not 0 < threshold < 65536:
    raise ValueError(f"dropout rate {rate} must be in (0, 1)")
  keep = draw(lambda k, s: _keep_bits(k, s, threshold), rng, shape)
  return keep, 65536.0 / threshold
