"""BERT masked-language-model pre-training (the MLM baseline), and the masking that
every masked-LM objective shares (`MaskedObjective`)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from amos_jax.errors import ConfigError
from amos_jax.model import flops
from amos_jax.model import rng as rng_lib
from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.model.heads import MLMHead
from amos_jax.objectives import masking
from amos_jax.objectives.base import HFModel, Objective


class MaskedObjective(Objective):
  """An objective that masks its input: the masking config is built once, from the
  objective section and the tokenizer's special ids."""

  def __init__(self, config, tokens=None):
    super().__init__(config, tokens)
    obj = config.objective
    self.masking = masking.MaskingConfig(
        mask_rate=obj.mask_rate, scheme=obj.mask_scheme,
        max_predictions=obj.get("max_predictions") or None,
        whole_word=bool(obj.get("whole_word", False)), mask_id=self.tokens.mask_id,
        vocab_size=config.model.vocab_size, special_ids=self.tokens.ids)

  @classmethod
  def validate_config(cls, config) -> None:
    o = config.objective
    if not 0.0 < o.mask_rate < 1.0:
      raise ConfigError(f"objective.mask_rate={o.mask_rate} must be in (0, 1)")
    if o.mask_scheme not in masking.SCHEMES:
      raise ConfigError(f"objective.mask_scheme={o.mask_scheme!r} is unknown; choose "
                        f"one of {', '.join(masking.SCHEMES)}")

  def mask_batch(self, rng, batch) -> masking.Masked:
    return masking.mask_tokens(rng, batch["input_ids"], batch["segment_ids"],
                               self.masking, batch.get("word_starts"))

  def loss_counts(self, batch) -> dict:
    """Masked predictions and real tokens in the whole batch (what the means divide
    by), so micro-batches' losses add up to the batch's."""
    counts = masking.num_predictions(batch["input_ids"], batch["segment_ids"],
                                     self.masking)
    return {"num_predictions": counts.sum(),
            "num_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32)}


class MaskedLanguageModel(nnx.Module):
  """BertForMaskedLM: `encoder` + tied `mlm_head`."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(cfg, rngs=rngs)
    self.mlm_head = MLMHead(cfg, rngs=rngs)


class MLM(MaskedObjective):
  name = "mlm"

  def build_model(self, rngs: nnx.Rngs) -> MaskedLanguageModel:
    return MaskedLanguageModel(EncoderConfig.from_config(self.config.model), rngs=rngs)

  def loss(self, model: MaskedLanguageModel, batch, counts, rng, train):
    """Mean MLM cross-entropy over the masked positions. Returns (loss, metrics)."""
    r_mask, r_dropout = rng_lib.split(rng, 2)
    masked = self.mask_batch(r_mask, batch)
    hidden = model.encoder(
        masked.input_ids, batch["segment_ids"], batch.get("positions"),
        batch.get("token_type_ids"), dropout_rng=r_dropout if train else None)[-1]
    logits = model.mlm_head(masking.gather_positions(hidden, masked.positions),
                            model.encoder.word_embeddings)
    loss, accuracy = masking.masked_lm_loss(logits, masked.labels, masked.weights,
                                            counts.get("num_predictions"))
    return loss, {"loss": loss, "mlm_loss": loss, "mlm_accuracy": accuracy}

  def model_flops(self, batch_size, seq_len):
    """Encoder at every token, MLM head at the K gathered slots per row."""
    cfg = EncoderConfig.from_config(self.config.model)
    k = self.masking.num_slots(seq_len)
    return flops.train_flops({
        "encoder": flops.encoder_forward_flops(cfg, batch_size, seq_len),
        "mlm_head": flops.mlm_head_forward_flops(cfg, batch_size * k)})

  def hf_models(self) -> list[HFModel]:
    cfg = EncoderConfig.from_config(self.config.model)
    # BERT cannot hold factorized embeddings (E != H); ELECTRA's MLM class can.
    arch = "BertForMaskedLM" if cfg.embed_size == cfg.hidden_size else "ElectraForMaskedLM"
    return [HFModel("", arch, "encoder", "mlm_head", cfg, role="the MLM encoder and head")]


OBJECTIVE = MLM
