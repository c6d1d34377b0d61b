"""ELECTRA replaced-token detection (Clark et al., ICLR 2020).

A small MLM generator fills the masked positions with samples from its softmax
(Gumbel-max, under stop_gradient); the discriminator labels every token as original
or replaced. Loss = mlm_weight * MLM + rtd_weight * RTD (1 and 50).
The model class and the RTD half are shared with AMOS (`amos.py`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from amos_jax.model import rng as rng_lib
from amos_jax.model.encoder import Encoder, EncoderConfig, dense
from amos_jax.model.heads import MLMHead, RTDHead
from amos_jax.objectives import masking
from amos_jax.objectives.mlm import loss_normalizers, mask_batch  # noqa: F401
from amos_jax.objectives.sampling import gumbel_max_sample, gumbel_noise


class ReplacedTokenDetection(nnx.Module):
  """Generator + discriminator sharing one embedding block.

  discriminator: Encoder (ElectraModel); discriminator_head: RTDHead;
  generator: Encoder over the discriminator's `embeddings`; generator_head: MLMHead
  tied to the shared word embeddings; mixture (AMOS only): bias-free Dense(H_g -> 1).
  """

  def __init__(self, disc_cfg: EncoderConfig, gen_cfg: EncoderConfig, *,
               rtd_head_layers: int, mixture: bool, rngs: nnx.Rngs):
    self.discriminator = Encoder(disc_cfg, rngs=rngs)
    self.generator = Encoder(gen_cfg, rngs=rngs, embeddings=self.discriminator.embeddings)
    self.generator_head = MLMHead(gen_cfg, rngs=rngs)
    self.discriminator_head = RTDHead(disc_cfg, rtd_head_layers, rngs=rngs)
    if mixture:
      self.mixture = dense(gen_cfg, gen_cfg.hidden_size, 1, ("embed", None), rngs,
                           use_bias=False)


def generator_config(config) -> EncoderConfig:
  """The generator: width round(H * f), heads round(N * f), depth from the config.

  ELECTRA uses f = 1/4 (small, large) or 1/3 (base) at full depth; AMOS uses the full
  width with depth = the deepest tapped layer. Embedding width stays the
  discriminator's (the block is shared; a projection E -> H_g is added if needed).
  """
  disc = EncoderConfig.from_config(config.model)
  gen = config.objective.generator
  f = gen.width_fraction
  hidden = int(round(disc.hidden_size * f))
  tap_layers = tuple(gen.get("tap_layers") or ())
  num_layers = gen.get("num_layers") or (max(tap_layers) if tap_layers else disc.num_layers)
  return dataclasses.replace(
      disc, hidden_size=hidden, intermediate_size=int(round(disc.intermediate_size * f)),
      num_heads=max(1, int(round(disc.num_heads * f))), num_layers=num_layers,
      embedding_size=disc.embed_size)


def build_model(config, rngs: nnx.Rngs) -> ReplacedTokenDetection:
  return ReplacedTokenDetection(
      EncoderConfig.from_config(config.model), generator_config(config),
      rtd_head_layers=config.objective.rtd_head_layers,
      mixture=bool(config.objective.get("mixture", False)), rngs=rngs)


def split_step_rng(rng: jax.Array):
  """(mask, generator dropout, sampling, discriminator dropout) keys, as AMOS uses."""
  return rng_lib.split(rng, 4)


def replaced_token_labels(positions, sampled, labels, weights, shape) -> jax.Array:
  """(B, T) bool: replaced = masked AND sampled != original (a lucky sample is original)."""
  replaced = (weights > 0) & (sampled != labels)
  return masking.scatter_positions(jnp.zeros(shape, bool), positions, replaced)


def rtd_loss(model: ReplacedTokenDetection, batch, input_ids, is_replaced, rng, *,
             replace=None):
  """Discriminator sigmoid cross-entropy averaged over non-padding tokens.

  input_ids, is_replaced: (B, T). Returns (loss, accuracy).
  """
  hidden = model.discriminator(
      input_ids, batch["segment_ids"], batch.get("positions"), batch.get("token_type_ids"),
      replace=replace, dropout_rng=rng)[-1]
  logits = model.discriminator_head(hidden)
  real = (batch["segment_ids"] > 0).astype(jnp.float32)
  denom = jnp.maximum(batch.get("num_tokens", real.sum()), 1.0)
  xent = optax.sigmoid_binary_cross_entropy(logits, is_replaced.astype(jnp.float32))
  accuracy = (((logits > 0) == is_replaced) * real).sum() / denom
  return (xent * real).sum() / denom, accuracy


def compute_loss(model: ReplacedTokenDetection, batch, rng, config, train: bool = True):
  """ELECTRA's loss: MLM on the generator + rtd_weight * RTD. Returns (loss, metrics)."""
  obj = config.objective
  r_mask, r_gen, r_sample, r_disc = split_step_rng(rng)
  masked = mask_batch(r_mask, batch, config)
  gen_hidden = model.generator(
      masked.input_ids, batch["segment_ids"], batch.get("positions"),
      batch.get("token_type_ids"),
      dropout_rng=r_gen if train and obj.generator.dropout else None)[-1]
  logits = model.generator_head(masking.gather_positions(gen_hidden, masked.positions),
                                model.discriminator.word_embeddings)
  mlm_loss, mlm_accuracy = masking.masked_lm_loss(logits, masked.labels, masked.weights,
                                                  batch.get("num_predictions"))

  # No discriminator gradient may reach the generator through the sample.
  logits = jax.lax.stop_gradient(logits)
  sampled = gumbel_max_sample(logits, gumbel_noise(r_sample, logits.shape),
                              obj.sampling_temperature)
  sampled = jnp.where(masked.weights > 0, sampled, masked.labels)
  disc_ids = masking.scatter_positions(masked.input_ids, masked.positions,
                                       sampled.astype(masked.input_ids.dtype))
  is_replaced = replaced_token_labels(masked.positions, sampled, masked.labels,
                                      masked.weights, disc_ids.shape)
  rtd, rtd_accuracy = rtd_loss(model, batch, disc_ids, is_replaced,
                               r_disc if train else None)
  loss = obj.mlm_weight * mlm_loss + obj.rtd_weight * rtd
  return loss, {"loss": loss, "mlm_loss": mlm_loss, "mlm_accuracy": mlm_accuracy,
                "rtd_loss": rtd, "rtd_accuracy": rtd_accuracy,
                "replaced_fraction": is_replaced.sum() / jnp.maximum(
                    batch.get("num_predictions", masked.weights.sum()), 1.0)}
