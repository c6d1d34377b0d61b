"""Output heads: masked-LM (tied to the word embeddings), replaced-token detection,
and sentence pooling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from amos_jax.model import ops
from amos_jax.model.encoder import EncoderConfig, dense, layer_norm
from amos_jax.model.partitioning import with_logical_axes


class MLMHead(nnx.Module):
  """dense H->E, GELU, LayerNorm, then logits = x @ word_embeddings.T + bias.

  The output projection is tied to the (V, E) word-embedding matrix; the head owns
  only its vocabulary bias (HF: `generator_lm_head.bias` / `cls.predictions.bias`).
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    e = cfg.embed_size
    self.dense = dense(cfg, cfg.hidden_size, e, ("embed", "embed_out"), rngs)
    self.LayerNorm = layer_norm(cfg, e, rngs)
    self.gelu_impl = cfg.gelu_impl
    self.bias = nnx.Param(
        with_logical_axes(nnx.initializers.zeros, ("vocab",))(
            rngs.params(), (cfg.vocab_size,), jnp.float32))

  def __call__(self, h: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    """h: (..., H), word_embeddings: (V, E) -> float32 logits (..., V)."""
    x = self.LayerNorm(ops.gelu(self.dense(h), self.gelu_impl))
    logits = x @ word_embeddings.astype(x.dtype).T
    return ops.add_bias(logits.astype(jnp.float32), self.bias[...])


class RTDHead(nnx.Module):
  """Replaced-token detection: one logit per token.

  num_layers=2 is ELECTRA's head (dense H->H, GELU, dense H->1; HF
  `discriminator_predictions.{dense,dense_prediction}`); num_layers=1 is AMOS's
  single Dense(H->1).
  """

  def __init__(self, cfg: EncoderConfig, num_layers: int = 2, *, rngs: nnx.Rngs):
    if num_layers not in (1, 2):
      raise ValueError(f"RTD head num_layers must be 1 or 2, got {num_layers}")
    h = cfg.hidden_size
    if num_layers == 2:
      self.dense = dense(cfg, h, h, ("embed", "mlp"), rngs)
    self.dense_prediction = dense(cfg, h, 1, ("embed", None), rngs)
    self.gelu_impl = cfg.gelu_impl

  def __call__(self, h: jax.Array) -> jax.Array:
    """h: (B, T, H) -> float32 logits (B, T)."""
    if hasattr(self, "dense"):
      h = ops.gelu(self.dense(h), self.gelu_impl)
    return self.dense_prediction(h)[..., 0].astype(jnp.float32)


def mean_pool(hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Mean over real tokens: (B, T, H), (B, T) -> (B, H) float32."""
  w = (segment_ids > 0).astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def cls_pool(hidden: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """The first token's hidden state: (B, T, H) -> (B, H) float32."""
  del segment_ids
  return hidden[:, 0].astype(jnp.float32)


def pool_segments(hidden: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                  slots: int, pooling: str) -> jax.Array:
  """Pooling per text of packed rows: (B, T, H), (B, T), (B, T) -> (B, slots, H) f32.

  Row b's text s (s = 1..slots) is its tokens with segment_ids == s; "mean" averages
  them, "cls" takes the text's first token (position 0). A row of one text
  (slots = 1) pools as `mean_pool` / `cls_pool`. Slots with no tokens are zero.
  """
  picked = segment_ids[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]  # (B, S, T)
  if pooling == "cls":
    picked &= (positions == 0)[:, None, :]
  w = picked.astype(jnp.float32)
  # A 0/1 weighted sum; HIGHEST keeps TPUs from rounding the f32 states to bf16.
  total = jnp.einsum("bst,bth->bsh", w, hidden.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return total / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
