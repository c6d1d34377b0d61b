"""The transformers/PyTorch ELECTRA pre-training step, for side-by-side timing.

  python benchmarks/torch_electra_baseline.py --batch_size 32 --seq_len 128 --steps 10

The standard recipe: ElectraForMaskedLM generator (1/4 width) and
ElectraForPreTraining discriminator sharing one embedding block, 15% masking
(85% [MASK]), Gumbel-max sampling of replacements without gradient, loss
MLM + 50 * RTD, AdamW. The MLM head runs over every position, as transformers does.
Sizes default to ELECTRA-small; `make_step` takes others (`compare_torch.py` passes
the JAX config's). Needs the test extra (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

SMALL = dict(vocab_size=30522, embedding_size=128, hidden_size=256, num_layers=12,
             num_heads=4, intermediate_size=1024, generator_fraction=0.25,
             max_position_embeddings=512, hidden_dropout=0.1, attention_dropout=0.1)


def make_step(batch_size: int, seq_len: int, sizes: dict = SMALL, threads: int = 0):
  """Builds the recipe and returns `step() -> loss` (one optimizer step)."""
  import torch
  from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  s = dict(SMALL, **sizes)
  f = s["generator_fraction"]
  common = dict(vocab_size=s["vocab_size"], embedding_size=s["embedding_size"],
                max_position_embeddings=s["max_position_embeddings"],
                num_hidden_layers=s["num_layers"], hidden_dropout_prob=s["hidden_dropout"],
                attention_probs_dropout_prob=s["attention_dropout"])
  disc = ElectraForPreTraining(ElectraConfig(
      hidden_size=s["hidden_size"], num_attention_heads=s["num_heads"],
      intermediate_size=s["intermediate_size"], **common))
  gen = ElectraForMaskedLM(ElectraConfig(
      hidden_size=int(round(s["hidden_size"] * f)),
      num_attention_heads=max(1, int(round(s["num_heads"] * f))),
      intermediate_size=int(round(s["intermediate_size"] * f)), **common))
  gen.electra.embeddings = disc.electra.embeddings
  params = list({id(q): q for m in (disc, gen) for q in m.parameters()}.values())
  opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
  b, t = batch_size, seq_len
  rng = np.random.default_rng(0)
  ids = torch.tensor(rng.integers(5, s["vocab_size"], (b, t)), dtype=torch.long)
  attn = torch.ones_like(ids)
  disc.train()
  gen.train()

  def step():
    mask = torch.rand(b, t) < 0.15
    masked = ids.clone()
    masked[mask & (torch.rand(b, t) < 0.85)] = 4
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    out = gen(input_ids=masked, attention_mask=attn, labels=labels)
    with torch.no_grad():
      logits = out.logits[mask]
      u = torch.rand_like(logits).clamp_min(1e-9)
      sampled = (logits - torch.log(-torch.log(u))).argmax(-1)
    disc_in = masked.clone()
    disc_in[mask] = sampled
    is_replaced = (disc_in != ids).float()
    d = disc(input_ids=disc_in, attention_mask=attn, labels=is_replaced)
    loss = out.loss + 50.0 * d.loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss)

  return step


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  args = p.parse_args(argv)
  import torch
  step = make_step(args.batch_size, args.seq_len, threads=args.threads)
  step()  # warm-up
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  b, t = args.batch_size, args.seq_len
  out = {"recipe": "transformers ELECTRA-small (PyTorch)", "batch": b, "seq_len": t,
         "median_step_s": round(med, 4), "tokens_per_s": round(b * t / med, 1),
         "threads": torch.get_num_threads(), "loss": loss}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
