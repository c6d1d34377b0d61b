"""Sampling operators of ELECTRA and AMOS: Gumbel noise, the straight-through hard
Gumbel-softmax, and gradient reversal."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from amos_jax.model import rng as rng_lib


def _positive_uniform(rng: jax.Array, shape) -> jax.Array:
  """float32 uniforms in (0, 1), one key or one per row of `shape`. rng_lib.uniform:
  jax.random.uniform's values, hashed inside the consumer's fusion (AMOS draws one
  per word of the vocabulary at every prediction)."""
  return rng_lib.draw(lambda k, s: rng_lib.uniform(k, s, minval=jnp.finfo(jnp.float32).tiny),
                      rng, shape)


def gumbel_noise(rng: jax.Array, shape) -> jax.Array:
  """Standard Gumbel(0, 1) noise, float32; rng: one key or one per row of `shape`."""
  return -jnp.log(-jnp.log(_positive_uniform(rng, shape)))


def gumbel_max_sample(logits: jax.Array, noise: jax.Array,
                      temperature: float = 1.0) -> jax.Array:
  """ELECTRA's sampler: argmax(logits / T + g) ~ softmax(logits / T). (..., V) -> (...)."""
  return jnp.argmax(logits / temperature + noise, axis=-1)


def inverse_cdf_sample(rng: jax.Array, logits: jax.Array, temperature: float = 1.0,
                       block: int = 256) -> jax.Array:
  """A sample of softmax(logits / T) from one uniform per row: (..., V) -> (...).

  The same distribution as Gumbel-max, from one random number per prediction
  instead of V (on CPU, V Gumbel draws over a 30k vocabulary cost about a tenth of
  an ELECTRA-small step). Inverse CDF in two levels, so no cumulative sum runs
  over all V words: the block of `block` words whose cumulative mass first
  reaches u * total, then, inside it, the word whose cumulative mass first
  reaches the conditional uniform. rng: one key, or one per row of the leading
  axis (per-row streams).
  """
  v = logits.shape[-1]
  nb = -(-v // block)
  p = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, nb * block - v)])
  blocks = p.reshape(p.shape[:-1] + (nb, block))                 # (..., nb, block)
  mass = blocks.sum(-1)                                          # (..., nb)
  cum = jnp.cumsum(mass, axis=-1)
  # u > 0, so the chosen block has positive mass.
  u = _positive_uniform(rng, logits.shape[:-1])
  target = u * cum[..., -1]
  b = jnp.minimum((cum < target[..., None]).sum(-1), nb - 1)     # first cum >= target
  before = jnp.where(b > 0, jnp.take_along_axis(
      cum, jnp.maximum(b - 1, 0)[..., None], -1)[..., 0], 0.0)
  inner = jnp.take_along_axis(blocks, b[..., None, None], -2)[..., 0, :]  # (..., block)
  inner_cum = jnp.cumsum(inner, axis=-1)
  # The conditional uniform, rescaled to the block's own sum: rounding can never
  # carry it past the block's last word of positive probability.
  fraction = jnp.clip((target - before) / jnp.take_along_axis(mass, b[..., None], -1)[..., 0],
                      0.0, 1.0)
  j = (inner_cum < (fraction * inner_cum[..., -1])[..., None]).sum(-1)
  return jnp.minimum(b * block + j, v - 1)


@jax.custom_vjp
def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """Forward: `hard` exactly. Backward: the cotangent goes to `soft` unchanged."""
  return hard


def _st_fwd(hard, soft):
  return hard, None


def _st_bwd(_, g):
  return jnp.zeros_like(g), g


straight_through.defvjp(_st_fwd, _st_bwd)


def gumbel_softmax_straight_through(logits: jax.Array, noise: jax.Array,
                                    temperature: float) -> jax.Array:
  """Hard Gumbel-softmax (Jang et al. 2017) with the straight-through estimator.

  y_soft = softmax((logits + g) / tau); forward value one_hot(argmax y_soft), exactly;
  backward d y_soft. logits, noise: (..., V) -> (..., V) float32.
  """
  y_soft = jax.nn.softmax((logits + noise) / temperature, axis=-1)
  y_hard = jax.nn.one_hot(jnp.argmax(y_soft, axis=-1), logits.shape[-1],
                          dtype=y_soft.dtype)
  return straight_through(y_hard, y_soft)


@jax.custom_vjp
def reverse_gradient(x: jax.Array) -> jax.Array:
  """Gradient reversal (Ganin & Lempitsky 2015): identity forward, -cotangent backward."""
  return x


def _rev_fwd(x):
  return x, None


def _rev_bwd(_, g):
  return (jax.tree.map(jnp.negative, g),)


reverse_gradient.defvjp(_rev_fwd, _rev_bwd)
