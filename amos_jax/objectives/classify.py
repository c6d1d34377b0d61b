"""Sequence classification and regression: fine-tuning an encoder on a labeled task
(GLUE-style, `amos_jax/data/glue.py`, `amos-eval glue`).

The model is the encoder (the same `encoder` root and Hugging Face names as mlm's)
plus a pooled representation (objective.pooling: 'cls', the first token, as BERT
fine-tunes; or 'mean' over the real tokens), dropout and one Dense(H -> num_labels).
objective.num_labels >= 2 is classification (cross-entropy against int32 `labels`);
num_labels = 1 is regression (mean squared error against float32 `labels`). Batches
carry `labels` (B,) besides `BATCH_KEYS`.

Every mean divides by the whole batch's example count (`loss_counts`), so
gradient-accumulation micro-batches add up to one step on the whole batch, metrics
included.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from amos_jax.errors import ConfigError
from amos_jax.model import flops
from amos_jax.model import rng as rng_lib
from amos_jax.model.encoder import Encoder, EncoderConfig, dense, dropout
from amos_jax.model.heads import cls_pool, mean_pool
from amos_jax.objectives.base import HFModel, Objective

POOLINGS = ("cls", "mean")


class SequenceClassifier(nnx.Module):
  """`encoder` + `classifier` (Dense H -> num_labels on the pooled hidden state)."""

  def __init__(self, cfg: EncoderConfig, num_labels: int, *, rngs: nnx.Rngs):
    self.encoder = Encoder(cfg, rngs=rngs)
    self.classifier = dense(cfg, cfg.hidden_size, num_labels, ("embed", None), rngs)


class Classify(Objective):
  name = "classify"

  def __init__(self, config, tokens=None):
    super().__init__(config, tokens)
    obj = config.objective
    self.num_labels = int(obj.get("num_labels", 2))
    self.pooling = obj.get("pooling") or "cls"
    rate = obj.get("classifier_dropout", -1.0)
    self.dropout_rate = float(config.model.hidden_dropout if rate is None or rate < 0
                              else rate)

  @property
  def regression(self) -> bool:
    return self.num_labels == 1

  @classmethod
  def validate_config(cls, config) -> None:
    o = config.objective
    n = o.get("num_labels", None)
    if n is None or int(n) < 1:
      raise ConfigError(f"objective.num_labels={n} must be >= 1 (1 = regression)")
    if (o.get("pooling") or "cls") not in POOLINGS:
      raise ConfigError(f"objective.pooling={o.pooling!r}: use cls or mean")
    rate = o.get("classifier_dropout", -1.0)
    if rate is not None and rate >= 1.0:
      raise ConfigError(f"objective.classifier_dropout={rate} must be below 1 "
                        "(negative: model.hidden_dropout)")

  def build_model(self, rngs: nnx.Rngs) -> SequenceClassifier:
    return SequenceClassifier(EncoderConfig.from_config(self.config.model),
                              self.num_labels, rngs=rngs)

  def outputs(self, model: SequenceClassifier, batch, dropout_rng=None) -> jax.Array:
    """float32 logits (B, num_labels), or predictions (B,) for regression."""
    r_encoder, r_head = (None, None) if dropout_rng is None else rng_lib.split(
        dropout_rng, 2)
    hidden = model.encoder(batch["input_ids"], batch["segment_ids"],
                           batch.get("positions"), batch.get("token_type_ids"),
                           dropout_rng=r_encoder)[-1]
    pool = cls_pool if self.pooling == "cls" else mean_pool
    pooled = dropout(pool(hidden, batch["segment_ids"]), self.dropout_rate, r_head)
    out = model.classifier(pooled).astype(jnp.float32)
    return out[:, 0] if self.regression else out

  def loss_counts(self, batch) -> dict:
    return {"num_examples": jnp.asarray(batch["labels"].shape[0], jnp.float32)}

  def loss(self, model, batch, counts, rng, train):
    """Mean cross-entropy (or squared error) over the batch. Returns (loss, metrics)."""
    out = self.outputs(model, batch, rng if train else None)
    n = counts.get("num_examples", jnp.asarray(batch["labels"].shape[0], jnp.float32))
    if self.regression:
      err = (out - batch["labels"].astype(jnp.float32)) ** 2
      loss = err.sum() / n
      return loss, {"loss": loss, "mse": loss}
    labels = batch["labels"].astype(jnp.int32)
    logp = jax.nn.log_softmax(out, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    loss = nll.sum() / n
    accuracy = (jnp.argmax(out, -1) == labels).astype(jnp.float32).sum() / n
    return loss, {"loss": loss, "accuracy": accuracy}

  def model_flops(self, batch_size, seq_len):
    cfg = EncoderConfig.from_config(self.config.model)
    return flops.train_flops({
        "encoder": flops.encoder_forward_flops(cfg, batch_size, seq_len),
        "classifier": 2.0 * batch_size * cfg.hidden_size * self.num_labels})

  def hf_models(self) -> list[HFModel]:
    """The bare encoder (BertModel, or ElectraModel for factorized embeddings): what
    `init_from=hf:PATH` fills; the classifier starts fresh."""
    cfg = EncoderConfig.from_config(self.config.model)
    arch = "BertModel" if cfg.embed_size == cfg.hidden_size else "ElectraModel"
    return [HFModel("", arch, "encoder", None, cfg, role="the fine-tuned encoder")]


OBJECTIVE = Classify
