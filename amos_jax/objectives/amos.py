"""AMOS: Adversarial Mixture Of Signals (Meng et al., ICLR 2022).

One unified generator stands for several MLM generators of different depth: a
full-width encoder whose shared MLM head is read at the tapped layers (default
4, 6, 8). Stop-gradients between segments make the head at layer l train only the
blocks since the previous tap. Per masked token, a bias-free Dense scores each
tap's hidden state; the softmax over taps gives mixture weights lambda, and

    mixed_logits = sum_m lambda_m * stop_gradient(logits_m).

A straight-through hard Gumbel-softmax (temperature 0.3) samples a one-hot
replacement, which passes `reverse_gradient` and is multiplied by the discriminator's
word-embedding matrix to form its input at the masked positions. The discriminator
minimizes the RTD loss; the mixture (and through it the generator's features)
receives the reversed gradient and so maximizes it. As in the reference code, only
the token matrix is shared (`objective.embedding_sharing=tokens`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from amos_jax.errors import ConfigError
from amos_jax.model import flops
from amos_jax.objectives import masking
from amos_jax.objectives.electra import (Electra, ReplacedTokenDetection,
                                         generator_config, replaced_token_labels,
                                         rtd_loss, split_step_rng)
from amos_jax.objectives.sampling import (gumbel_noise, gumbel_softmax_straight_through,
                                          reverse_gradient)


def tap_layers(config) -> tuple[int, ...]:
  return tuple(sorted(int(l) for l in config.objective.generator.tap_layers))


def mixture_weights(model, tapped_hidden: list[jax.Array], mixture: bool) -> jax.Array:
  """Per-token weights over the M generators: M x (B, K, H) -> (B, K, M) float32.

  With the mixture disabled the generators are weighted uniformly (one tap: 1.0).
  """
  if not mixture:
    b, k, _ = tapped_hidden[0].shape
    m = len(tapped_hidden)
    return jnp.full((b, k, m), 1.0 / m, jnp.float32)
  scores = jnp.stack([model.mixture(h)[..., 0] for h in tapped_hidden], axis=-1)
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


class Amos(Electra):
  name = "amos"

  @classmethod
  def validate_config(cls, config) -> None:
    super().validate_config(config)
    o = config.objective
    taps = tuple(o.generator.tap_layers)
    if not taps or min(taps) < 1:
      raise ConfigError("objective.generator.tap_layers must list layers >= 1, e.g. "
                        "(4, 6, 8)")
    if len(set(taps)) != len(taps):
      raise ConfigError(f"objective.generator.tap_layers={taps} repeats a layer")
    depth = o.generator.get("num_layers") or 0
    if depth and max(taps) > depth:
      raise ConfigError(f"objective.generator.tap_layers={taps} reach beyond "
                        f"objective.generator.num_layers={depth}")
    if o.head_loss_reduction not in ("sum", "mean"):
      raise ConfigError(f"objective.head_loss_reduction={o.head_loss_reduction!r}: use "
                        "'sum' or 'mean'")
    if o.sampling_temperature <= 0:
      raise ConfigError(f"objective.sampling_temperature={o.sampling_temperature} must "
                        "be > 0")

  def loss(self, model: ReplacedTokenDetection, batch, counts, rng, train):
    """AMOS's loss: sum (or mean) of the taps' MLM losses + rtd_weight * RTD."""
    obj = self.config.objective
    taps = tap_layers(self.config)
    r_mask, r_gen, r_sample, r_disc = split_step_rng(rng)
    masked = self.mask_batch(r_mask, batch)
    hidden_states = model.generator(
        masked.input_ids, batch["segment_ids"], batch.get("positions"),
        batch.get("token_type_ids"),
        dropout_rng=r_gen if train and obj.generator.dropout else None,
        stop_gradient_after=taps[:-1], num_layers=taps[-1])
    num_predictions = counts.get("num_predictions")

    metrics = {}
    tapped = [masking.gather_positions(hidden_states[l], masked.positions) for l in taps]
    tap_logits, mlm_losses = [], []
    for layer, h in zip(taps, tapped):
      logits = model.generator_head(h, model.generator.word_embeddings)  # (B, K, V)
      loss_l, acc_l = masking.masked_lm_loss(logits, masked.labels, masked.weights,
                                             num_predictions)
      tap_logits.append(logits)
      mlm_losses.append(loss_l)
      metrics[f"mlm_loss_{layer}"] = loss_l
      metrics[f"mlm_accuracy_{layer}"] = acc_l
    mlm_loss = sum(mlm_losses)
    if obj.head_loss_reduction == "mean":
      mlm_loss = mlm_loss / len(taps)

    lam = mixture_weights(model, tapped, bool(obj.mixture))       # (B, K, M)
    mixed = sum(lam[..., m, None] * jax.lax.stop_gradient(tap_logits[m])
                for m in range(len(taps)))
    noise = gumbel_noise(r_sample, mixed.shape)
    if obj.get("hard_sample", True):
      sample = gumbel_softmax_straight_through(mixed, noise, obj.sampling_temperature)
    else:  # the soft relaxation whose gradient the straight-through estimator uses
      sample = jax.nn.softmax((mixed + noise) / obj.sampling_temperature, axis=-1)
    if obj.get("adversarial", True):
      sample = reverse_gradient(sample)  # ablation off: a cooperative mixture
    # Prediction slots that are padding keep their original token.
    valid = masked.weights[..., None] > 0
    sample = jnp.where(valid, sample, jax.nn.one_hot(masked.labels, sample.shape[-1]))
    # The gradient into the matrix is not reversed (the reversal sits on `sample`).
    rows = sample @ model.discriminator.word_embeddings
    if obj.get("hard_sample", True):
      # Each row of `sample` is exactly one-hot: its word is the dot product with
      # 0..V-1, a matvec instead of an argmax reduction over V, which XLA's CPU
      # backend runs unvectorized. Exact in float32 at full precision (a TPU's
      # default single bfloat16 pass would round the word numbers).
      word = jnp.arange(sample.shape[-1], dtype=jnp.float32)
      sampled = jnp.rint(jnp.dot(jax.lax.stop_gradient(sample).astype(jnp.float32), word,
                                 precision=jax.lax.Precision.HIGHEST)).astype(jnp.int32)
    else:
      sampled = jnp.argmax(sample, axis=-1)
    disc_ids = masking.scatter_positions(masked.input_ids, masked.positions,
                                         sampled.astype(masked.input_ids.dtype))
    is_replaced = replaced_token_labels(masked.positions, sampled, masked.labels,
                                        masked.weights, disc_ids.shape)
    rtd, rtd_accuracy = rtd_loss(
        model, batch, counts, disc_ids, is_replaced, r_disc if train else None,
        replace=(masked.positions, rows))

    denom = jnp.maximum(counts.get("num_predictions", masked.weights.sum()), 1.0)
    for m, layer in enumerate(taps):
      metrics[f"mixture_weight_{layer}"] = (lam[..., m] * masked.weights).sum() / denom
    loss = obj.mlm_weight * mlm_loss + obj.rtd_weight * rtd
    metrics.update(loss=loss, mlm_loss=mlm_loss, rtd_loss=rtd, rtd_accuracy=rtd_accuracy,
                   replaced_fraction=is_replaced.sum() / denom)
    return loss, metrics

  def model_flops(self, batch_size, seq_len):
    """The generator up to its deepest tap; the shared MLM head once per tap and the
    mixture scores at the K gathered slots; the one-hot samples times the token
    matrix (the discriminator's input rows); discriminator and RTD head."""
    counts = super().model_flops(batch_size, seq_len)
    counts.pop("total")
    gen = generator_config(self.config)
    taps = tap_layers(self.config)
    slots = batch_size * self.masking.num_slots(seq_len)
    fwd = {k: v / flops.TRAIN_FACTOR for k, v in counts.items()}
    fwd["generator"] = flops.encoder_forward_flops(gen, batch_size, seq_len, taps[-1])
    fwd["generator_head"] = len(taps) * flops.mlm_head_forward_flops(gen, slots)
    fwd["mixture"] = float(len(taps) * slots * 2 * gen.hidden_size
                           ) if self.config.objective.mixture else 0.0
    fwd["sampled_rows"] = float(slots * 2 * gen.vocab_size * gen.embed_size)
    return flops.train_flops(fwd)

  def generator_depths(self) -> list[tuple[str, int]]:
    """One complete MLM per tapped depth: the shared head read after l blocks."""
    return [(f"generator_layer{l}", l) for l in tap_layers(self.config)]


OBJECTIVE = Amos
