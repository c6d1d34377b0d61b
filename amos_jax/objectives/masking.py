"""On-device masking for masked-LM objectives.

Masks are drawn inside the jitted step from `fold_in(rng, step)`, so the input
pipeline carries no masking state and a resumed run masks identically.
Predictions are gathered to a fixed K = `max_predictions` slots per sequence: the
MLM head, generator logits and sampling then touch K positions, not all T.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from amos_jax.model import ops
from amos_jax.model import rng as rng_lib

# Replacement schemes: (P[MASK], P[random token]); the rest keep the original.
SCHEMES = {
    "bert": (0.8, 0.1),     # BERT 80/10/10
    "electra": (0.85, 0.0),  # ELECTRA 85/15, no random tokens
}


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  mask_rate: float = 0.15
  scheme: str = "bert"
  max_predictions: int | None = None  # None: ceil(mask_rate * seq_len)
  whole_word: bool = False
  mask_id: int = 4
  vocab_size: int = 30522
  special_ids: tuple[int, ...] = (0, 1, 2, 3, 4)  # never selected for prediction

  def num_slots(self, seq_len: int) -> int:
    if self.max_predictions:
      return min(self.max_predictions, seq_len)
    return min(seq_len, max(1, math.ceil(self.mask_rate * seq_len)))


@dataclasses.dataclass
class Masked:
  """input_ids: (B, T) with replacements applied; positions, labels, weights: (B, K)."""
  input_ids: jax.Array
  positions: jax.Array
  labels: jax.Array
  weights: jax.Array  # float32 1.0 for a real prediction slot, 0.0 for padding


jax.tree_util.register_dataclass(
    Masked, data_fields=["input_ids", "positions", "labels", "weights"], meta_fields=[])


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x: (B, T, ...) and positions: (B, K) -> (B, K, ...)."""
  return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)),
                             axis=1)


def scatter_positions(x: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
  """Writes values (B, K, ...) into x (B, T, ...) at positions (B, K)."""
  return x.at[jnp.arange(x.shape[0])[:, None], positions].set(values)


def _maskable(input_ids, segment_ids, cfg: MaskingConfig) -> jax.Array:
  maskable = segment_ids > 0
  for s in cfg.special_ids:
    maskable &= input_ids != s
  return maskable


def _num_to_mask(maskable: jax.Array, k: int, cfg: MaskingConfig) -> jax.Array:
  """(B, 1): n = clip(round(mask_rate * maskable), 1, K) predictions per row."""
  num_maskable = maskable.sum(axis=1, keepdims=True)
  return jnp.clip(jnp.round(cfg.mask_rate * num_maskable), 1, k)


def num_predictions(input_ids: jax.Array, segment_ids: jax.Array,
                    cfg: MaskingConfig) -> jax.Array:
  """Real prediction slots per row, (B,) float32, without drawing the masks.

  Equals `mask_tokens(...).weights.sum(1)` for any key: a row predicts
  min(n, maskable) tokens. Gradient accumulation needs the whole batch's count to
  normalize each micro-batch's loss.
  """
  maskable = _maskable(input_ids, segment_ids, cfg)
  n = _num_to_mask(maskable, cfg.num_slots(input_ids.shape[1]), cfg)[:, 0]
  return jnp.minimum(n, maskable.sum(axis=1)).astype(jnp.float32)


def mask_tokens(rng: jax.Array, input_ids: jax.Array, segment_ids: jax.Array,
                cfg: MaskingConfig, word_starts: jax.Array | None = None) -> Masked:
  """Selects ~mask_rate of the maskable tokens per row and applies the scheme.

  input_ids, segment_ids (0 = padding), word_starts: (B, T). Each row predicts
  n = clip(round(mask_rate * maskable), 1, K) tokens, chosen uniformly at random
  (whole words together when `whole_word` and word_starts are given).
  rng: one key, or one key per row (B,) (see `amos_jax.model.rng`).
  """
  b, t = input_ids.shape
  k = cfg.num_slots(t)
  r_select, r_scheme, r_random = rng_lib.split(rng, 3)
  maskable = _maskable(input_ids, segment_ids, cfg)

  if cfg.whole_word and word_starts is not None:
    # Every token of a word shares its word's score, so words are taken whole.
    word_index = jnp.cumsum(word_starts.astype(jnp.int32), axis=1)
    scores = jnp.take_along_axis(rng_lib.draw(jax.random.uniform, r_select, (b, t + 1)),
                                 word_index, axis=1)
  else:
    scores = rng_lib.draw(jax.random.uniform, r_select, (b, t))
  scores = jnp.where(maskable, scores, -1.0)
  top_scores, positions = jax.lax.top_k(scores, k)
  n = _num_to_mask(maskable, k, cfg)
  weights = (jnp.arange(k)[None, :] < n) & (top_scores >= 0.0)
  labels = gather_positions(input_ids, positions)

  p_mask, p_random = SCHEMES[cfg.scheme]
  u = rng_lib.draw(jax.random.uniform, r_scheme, (b, k))
  random_tokens = rng_lib.draw(
      lambda key, s: jax.random.randint(key, s, 0, cfg.vocab_size), r_random, (b, k))
  replaced = jnp.where(u < p_mask, cfg.mask_id,
                       jnp.where(u < p_mask + p_random, random_tokens, labels))
  replaced = jnp.where(weights, replaced, labels).astype(input_ids.dtype)
  return Masked(input_ids=scatter_positions(input_ids, positions, replaced),
                positions=positions, labels=labels,
                weights=weights.astype(jnp.float32))


def masked_lm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                   denom: jax.Array | None = None):
  """Mean cross-entropy over real prediction slots.

  logits: (B, K, V) float32; labels, weights: (B, K). denom: the count to divide by
  (default weights.sum(); a micro-batch passes its whole batch's). Returns
  (loss, accuracy).
  """
  nll = ops.softmax_cross_entropy(logits, labels)
  denom = jnp.maximum(weights.sum() if denom is None else denom, 1.0)
  # Correct when the label's logit is the largest: argmax's answer without its
  # (value, index) reduction over V, which XLA's CPU backend runs unvectorized
  # (about 30 ms per 640 x 30k head); they differ only on exact ties.
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  correct = picked >= logits.max(-1)
  accuracy = (correct * weights).sum() / denom
  return (nll * weights).sum() / denom, accuracy
