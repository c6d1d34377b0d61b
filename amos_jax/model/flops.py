"""Analytic model FLOPs: what a step computes, counted from the shapes.

Conventions (those of MFU reports, e.g. PaLM's appendix B and MaxText): only matrix
products count, at 2 FLOPs per multiply-add; attention is bidirectional and counted
in full (T x T scores per head, no causal halving); a training step is forward +
backward = 3 x forward; recomputation under remat is not model work and is not
counted. Element-wise work (GELU, LayerNorm, softmax, dropout) is left out.
"""
from __future__ import annotations

from amos_jax.model.encoder import EncoderConfig

TRAIN_FACTOR = 3  # forward + backward (the backward costs two forwards)


def encoder_forward_flops(cfg: EncoderConfig, batch: int, seq_len: int,
                          num_layers: int | None = None) -> float:
  """Forward FLOPs of `num_layers` blocks (default all) and the E -> H projection."""
  h, i, t = cfg.hidden_size, cfg.intermediate_size, seq_len
  layers = cfg.num_layers if num_layers is None else num_layers
  per_token = 2 * (4 * h * h + 2 * h * i)       # Q, K, V, output; FFN in and out
  attention = 2 * 2 * t * h                      # scores Q K^T and probs @ V, per token
  flops = layers * batch * t * (per_token + attention)
  if cfg.embed_size != cfg.hidden_size:
    flops += batch * t * 2 * cfg.embed_size * h
  return float(flops)


def mlm_head_forward_flops(cfg: EncoderConfig, positions: int) -> float:
  """The tied MLM head at `positions` gathered positions: dense H -> E, E -> V."""
  e = cfg.embed_size
  return float(positions * 2 * (cfg.hidden_size * e + e * cfg.vocab_size))


def rtd_head_forward_flops(cfg: EncoderConfig, tokens: int, num_layers: int) -> float:
  """ELECTRA's head (dense H -> H, H -> 1) or AMOS's single H -> 1, at every token."""
  h = cfg.hidden_size
  return float(tokens * 2 * (h * h * (num_layers == 2) + h))


def train_flops(forward: dict[str, float]) -> dict[str, float]:
  """Per-component forward FLOPs -> training FLOPs (x3), with their total."""
  out = {k: TRAIN_FACTOR * v for k, v in forward.items()}
  out["total"] = float(sum(out.values()))
  return out
