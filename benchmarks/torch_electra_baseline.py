"""The transformers/PyTorch ELECTRA-small pre-training step, for side-by-side timing.

  python benchmarks/torch_electra_baseline.py --batch_size 32 --seq_len 128 --steps 10

The standard recipe: ElectraForMaskedLM generator (1/4 width) and
ElectraForPreTraining discriminator sharing one embedding block, 15% masking
(85% [MASK]), Gumbel-max sampling of replacements without gradient, loss
MLM + 50 * RTD, AdamW. The MLM head runs over every position, as transformers does.
Needs the test extra (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  args = p.parse_args(argv)

  import torch
  from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  common = dict(vocab_size=30522, embedding_size=128, max_position_embeddings=512,
                num_hidden_layers=12)
  disc = ElectraForPreTraining(ElectraConfig(hidden_size=256, num_attention_heads=4,
                                             intermediate_size=1024, **common))
  gen = ElectraForMaskedLM(ElectraConfig(hidden_size=64, num_attention_heads=1,
                                         intermediate_size=256, **common))
  gen.electra.embeddings = disc.electra.embeddings
  params = {id(q): q for m in (disc, gen) for q in m.parameters()}.values()
  opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
  b, t = args.batch_size, args.seq_len
  rng = np.random.default_rng(0)
  ids = torch.tensor(rng.integers(5, 30522, (b, t)), dtype=torch.long)
  attn = torch.ones_like(ids)

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

  disc.train()
  gen.train()
  step()  # warm-up
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  out = {"recipe": "transformers ELECTRA-small (PyTorch)", "batch": b, "seq_len": t,
         "median_step_s": round(med, 4), "tokens_per_s": round(b * t / med, 1),
         "threads": torch.get_num_threads(), "loss": loss}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
