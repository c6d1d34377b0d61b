"""ELECTRA replaced-token detection (Clark et al., ICLR 2020).

A small MLM generator fills the masked positions with samples from its softmax
(Gumbel-max, under stop_gradient); the discriminator labels every token as original
or replaced. Loss = mlm_weight * MLM + rtd_weight * RTD (1 and 50).
The model, embedding sharing and the RTD half are shared with AMOS (`amos.py`).

Embedding sharing (`objective.embedding_sharing`):
  all     the generator reads the discriminator's whole embedding block (ELECTRA)
  tokens  only the token matrix is shared; the generator keeps its own position and
          token-type embeddings and LayerNorm (AMOS's reference code)
  gdes    DeBERTa-v3's gradient-disentangled sharing: the discriminator reads
          stop_gradient(E_G) + E_delta (E_delta starts at zero), so MLM alone trains
          E_G and RTD alone trains E_delta; export writes E_G + E_delta
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from amos_jax.errors import ConfigError
from amos_jax.model import flops
from amos_jax.model import rng as rng_lib
from amos_jax.model.encoder import Embeddings, Encoder, EncoderConfig, dense
from amos_jax.model.heads import MLMHead, RTDHead
from amos_jax.objectives import masking
from amos_jax.objectives.base import HFModel
from amos_jax.objectives.mlm import MaskedObjective
from amos_jax.objectives.sampling import gumbel_max_sample, gumbel_noise, inverse_cdf_sample

EMBEDDING_SHARING = ("all", "tokens", "gdes")
_DELTA = ("discriminator", "embeddings", "word_embeddings_delta")
_DISC_WORDS = ("discriminator", "embeddings", "word_embeddings", "embedding")
_GEN_WORDS = ("generator", "embeddings", "word_embeddings", "embedding")


class ReplacedTokenDetection(nnx.Module):
  """Generator + discriminator sharing embeddings as `sharing` says.

  discriminator: Encoder (ElectraModel); discriminator_head: RTDHead;
  generator: Encoder; generator_head: MLMHead tied to the generator's token matrix;
  mixture (AMOS only): bias-free Dense(H_g -> 1).
  """

  def __init__(self, disc_cfg: EncoderConfig, gen_cfg: EncoderConfig, *,
               rtd_head_layers: int, mixture: bool, sharing: str, rngs: nnx.Rngs):
    disc_embeddings = Embeddings(disc_cfg, rngs=rngs, delta=sharing == "gdes")
    self.discriminator = Encoder(disc_cfg, rngs=rngs, embeddings=disc_embeddings)
    if sharing == "all":
      gen_embeddings = disc_embeddings
    else:
      gen_embeddings = Embeddings(gen_cfg, rngs=rngs,
                                  word_embeddings=disc_embeddings.word_embeddings)
    self.generator = Encoder(gen_cfg, rngs=rngs, embeddings=gen_embeddings)
    self.generator_head = MLMHead(gen_cfg, rngs=rngs)
    self.discriminator_head = RTDHead(disc_cfg, rtd_head_layers, rngs=rngs)
    if mixture:
      self.mixture = dense(gen_cfg, gen_cfg.hidden_size, 1, ("embed", None), rngs,
                           use_bias=False)


def generator_config(config) -> EncoderConfig:
  """The generator: width round(H * f), heads round(N * f), depth from the config.

  ELECTRA uses f = 1/4 (small, large) or 1/3 (base) at full depth; AMOS uses the full
  width with depth = the deepest tapped layer. Embedding width stays the
  discriminator's (the token matrix is shared; a projection E -> H_g is added if
  needed).
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


def split_step_rng(rng: jax.Array):
  """(mask, generator dropout, sampling, discriminator dropout) keys, as AMOS uses."""
  return rng_lib.split(rng, 4)


def replaced_token_labels(positions, sampled, labels, weights, shape) -> jax.Array:
  """(B, T) bool: replaced = masked AND sampled != original (a lucky sample is original)."""
  replaced = (weights > 0) & (sampled != labels)
  return masking.scatter_positions(jnp.zeros(shape, bool), positions, replaced)


def rtd_loss(model: ReplacedTokenDetection, batch, counts, input_ids, is_replaced, rng,
             *, replace=None):
  """Discriminator sigmoid cross-entropy averaged over non-padding tokens.

  input_ids, is_replaced: (B, T). counts["num_tokens"]: the whole batch's real
  tokens (default: this batch's). Returns (loss, accuracy).
  """
  hidden = model.discriminator(
      input_ids, batch["segment_ids"], batch.get("positions"), batch.get("token_type_ids"),
      replace=replace, dropout_rng=rng)[-1]
  logits = model.discriminator_head(hidden)
  real = (batch["segment_ids"] > 0).astype(jnp.float32)
  denom = jnp.maximum(counts.get("num_tokens", real.sum()), 1.0)
  xent = optax.sigmoid_binary_cross_entropy(logits, is_replaced.astype(jnp.float32))
  accuracy = (((logits > 0) == is_replaced) * real).sum() / denom
  return (xent * real).sum() / denom, accuracy


class Electra(MaskedObjective):
  name = "electra"

  @classmethod
  def validate_config(cls, config) -> None:
    super().validate_config(config)
    m, o = config.model, config.objective
    g = o.generator
    hidden = int(round(m.hidden_size * g.width_fraction))
    heads = max(1, int(round(m.num_heads * g.width_fraction)))
    if hidden < 1 or hidden % heads:
      raise ConfigError(
          f"objective.generator.width_fraction={g.width_fraction} gives a generator "
          f"width {hidden} that its {heads} heads do not divide")
    if o.rtd_head_layers not in (1, 2):
      raise ConfigError(f"objective.rtd_head_layers={o.rtd_head_layers} must be 1 or 2")
    if o.get("sampler", "inverse_cdf") not in ("inverse_cdf", "gumbel"):
      raise ConfigError(f"objective.sampler={o.sampler!r}: use 'inverse_cdf' (one uniform "
                        "per prediction) or 'gumbel' (Gumbel-max, one draw per word)")
    if o.embedding_sharing not in EMBEDDING_SHARING:
      raise ConfigError(f"objective.embedding_sharing={o.embedding_sharing!r}: use "
                        f"{', '.join(EMBEDDING_SHARING)}")

  def build_model(self, rngs: nnx.Rngs) -> ReplacedTokenDetection:
    o = self.config.objective
    return ReplacedTokenDetection(
        EncoderConfig.from_config(self.config.model), generator_config(self.config),
        rtd_head_layers=o.rtd_head_layers, mixture=bool(o.get("mixture", False)),
        sharing=o.embedding_sharing, rngs=rngs)

  def loss(self, model: ReplacedTokenDetection, batch, counts, rng, train):
    """ELECTRA's loss: MLM on the generator + rtd_weight * RTD. Returns (loss, metrics)."""
    obj = self.config.objective
    r_mask, r_gen, r_sample, r_disc = split_step_rng(rng)
    masked = self.mask_batch(r_mask, batch)
    gen_hidden = model.generator(
        masked.input_ids, batch["segment_ids"], batch.get("positions"),
        batch.get("token_type_ids"),
        dropout_rng=r_gen if train and obj.generator.dropout else None)[-1]
    logits = model.generator_head(masking.gather_positions(gen_hidden, masked.positions),
                                  model.generator.word_embeddings)
    mlm_loss, mlm_accuracy = masking.masked_lm_loss(logits, masked.labels, masked.weights,
                                                    counts.get("num_predictions"))

    # No discriminator gradient may reach the generator through the sample.
    logits = jax.lax.stop_gradient(logits)
    if obj.get("sampler", "inverse_cdf") == "gumbel":
      sampled = gumbel_max_sample(logits, gumbel_noise(r_sample, logits.shape),
                                  obj.sampling_temperature)
    else:
      sampled = inverse_cdf_sample(r_sample, logits, obj.sampling_temperature)
    sampled = jnp.where(masked.weights > 0, sampled, masked.labels)
    disc_ids = masking.scatter_positions(masked.input_ids, masked.positions,
                                         sampled.astype(masked.input_ids.dtype))
    is_replaced = replaced_token_labels(masked.positions, sampled, masked.labels,
                                        masked.weights, disc_ids.shape)
    rtd, rtd_accuracy = rtd_loss(model, batch, counts, disc_ids, is_replaced,
                                 r_disc if train else None)
    loss = obj.mlm_weight * mlm_loss + obj.rtd_weight * rtd
    return loss, {"loss": loss, "mlm_loss": mlm_loss, "mlm_accuracy": mlm_accuracy,
                  "rtd_loss": rtd, "rtd_accuracy": rtd_accuracy,
                  "replaced_fraction": is_replaced.sum() / jnp.maximum(
                      counts.get("num_predictions", masked.weights.sum()), 1.0)}

  def model_flops(self, batch_size, seq_len):
    """Generator and discriminator at every token; the generator's MLM head at the
    K gathered slots per row; the RTD head at every token."""
    disc, gen = EncoderConfig.from_config(self.config.model), generator_config(self.config)
    k = self.masking.num_slots(seq_len)
    return flops.train_flops({
        "generator": flops.encoder_forward_flops(gen, batch_size, seq_len),
        "generator_head": flops.mlm_head_forward_flops(gen, batch_size * k),
        "discriminator": flops.encoder_forward_flops(disc, batch_size, seq_len),
        "rtd_head": flops.rtd_head_forward_flops(
            disc, batch_size * seq_len, self.config.objective.rtd_head_layers)})

  # ----------------------------------------------------------- Hugging Face
  def generator_depths(self) -> list[tuple[str, int]]:
    """(sub-folder, depth) of each exported generator."""
    return [("generator", generator_config(self.config).num_layers)]

  def hf_models(self) -> list[HFModel]:
    disc = EncoderConfig.from_config(self.config.model)
    gen = generator_config(self.config)
    models = [HFModel("", "ElectraForPreTraining", "discriminator", "discriminator_head",
                      disc, role="the discriminator and its replaced-token-detection head")]
    for subdir, depth in self.generator_depths():
      models.append(HFModel(
          subdir, "ElectraForMaskedLM", "generator", "generator_head",
          dataclasses.replace(gen, num_layers=depth), num_layers=depth,
          shared_embeddings="discriminator",
          role=f"the generator read after {depth} blocks"))
    return models

  def export_params(self, flat):
    """GDES: the discriminator's matrix is E_G + E_delta, the generator's E_G."""
    if _DELTA not in flat:
      return flat
    out = {p: v for p, v in flat.items() if p != _DELTA}
    out[_GEN_WORDS] = flat[_DISC_WORDS]
    out[_DISC_WORDS] = flat[_DISC_WORDS] + flat[_DELTA]
    return out


OBJECTIVE = Electra
