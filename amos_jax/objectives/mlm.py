"""BERT masked-language-model pre-training (the MLM baseline)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from amos_jax.model import rng as rng_lib

from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.model.heads import MLMHead
from amos_jax.objectives import masking


class MaskedLanguageModel(nnx.Module):
  """BertForMaskedLM: `encoder` + tied `mlm_head`."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(cfg, rngs=rngs)
    self.mlm_head = MLMHead(cfg, rngs=rngs)


def build_model(config, rngs: nnx.Rngs) -> MaskedLanguageModel:
  return MaskedLanguageModel(EncoderConfig.from_config(config.model), rngs=rngs)


def compute_loss(model: MaskedLanguageModel, batch, rng, config, train: bool = True):
  """Mean MLM cross-entropy over the masked positions. Returns (loss, metrics)."""
  r_mask, r_dropout = rng_lib.split(rng, 2)
  masked = mask_batch(r_mask, batch, config)
  hidden = model.encoder(
      masked.input_ids, batch["segment_ids"], batch.get("positions"),
      batch.get("token_type_ids"), dropout_rng=r_dropout if train else None)[-1]
  logits = model.mlm_head(masking.gather_positions(hidden, masked.positions),
                          model.encoder.word_embeddings)
  loss, accuracy = masking.masked_lm_loss(logits, masked.labels, masked.weights,
                                          batch.get("num_predictions"))
  return loss, {"loss": loss, "mlm_loss": loss, "mlm_accuracy": accuracy}


def loss_normalizers(batch, config) -> dict:
  """The whole batch's counts that the loss means divide by, for micro-batches.

  With them in each micro-batch, every loss and metric is a sum over rows divided
  by a batch-wide count, so the micro-batches' values add up to the batch's.
  """
  counts = masking.num_predictions(batch["input_ids"], batch["segment_ids"],
                                   masking_config(config))
  return {"num_predictions": counts.sum(),
          "num_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}


def mask_batch(rng, batch, config) -> masking.Masked:
  """Masks a batch as the config says (every objective masks through this)."""
  return masking.mask_tokens(rng, batch["input_ids"], batch["segment_ids"],
                             masking_config(config), batch.get("word_starts"))


def masking_config(config) -> masking.MaskingConfig:
  """The objective's masking settings plus the tokenizer's special ids."""
  obj, data = config.objective, config.data
  return masking.MaskingConfig(
      mask_rate=obj.mask_rate, scheme=obj.mask_scheme,
      max_predictions=obj.get("max_predictions") or None,
      whole_word=obj.get("whole_word", False), mask_id=data.mask_id,
      vocab_size=config.model.vocab_size, special_ids=tuple(data.special_ids))
