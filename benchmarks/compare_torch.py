"""The JAX ELECTRA step against the transformers + torch recipe at the same sizes,
alternating in one process so that machine drift cancels; prints the ratio.

  python benchmarks/compare_torch.py --config configs/electra.py:small \
      --config.train.batch_size=32 --config.train.seq_len=128 --rounds 5

Both are built (and the JAX step compiled) once; then each round times one window
of --window_steps steps of JAX (one sync at the end) and one of torch. The ratio is
of the medians over rounds; the per-round ratios show the spread. Sizes, batch,
sequence length and dropout come from the JAX config (an ELECTRA config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--window_steps", type=int, default=1)
  p.add_argument("--json", default="")
  args = p.parse_args(rest)
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  config = config_lib.freeze(config)
  if config.objective.name != "electra":
    raise SystemExit("compare_torch.py compares the ELECTRA recipe: use configs/electra.py")

  from amos_jax import hostcpu
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  hostcpu.split_host(1)  # as amos-train: AMOS_JAX_CPU_DEVICES=N to split
  import jax
  from amos_jax.model.partitioning import axis_rules
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train.bench import random_batch
  from amos_jax.train.step import build_trainer
  from benchmarks.torch_electra_baseline import make_step

  m, t = config.model, config.train
  config_lib.validate(config, jax.device_count())
  mesh = shd.build_mesh(config.mesh)
  trainer = build_trainer(get_objective(config), mesh)
  batch = jax.device_put(random_batch(config), trainer.batch_sharding)
  torch_step = make_step(t.batch_size, t.seq_len, dict(
      vocab_size=m.vocab_size, embedding_size=m.embedding_size or m.hidden_size,
      hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
      intermediate_size=m.intermediate_size,
      generator_fraction=config.objective.generator.width_fraction,
      max_position_embeddings=m.max_position_embeddings, hidden_dropout=m.hidden_dropout,
      attention_dropout=m.attention_dropout))

  state = trainer.state
  with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
    start = time.perf_counter()
    state, _ = trainer.train_step(state, batch)  # compile + first step
    jax.block_until_ready(state)
    first_jax = time.perf_counter() - start
    torch_step()  # warm-up
    jax_times, torch_times = [], []
    for _ in range(args.rounds):
      start = time.perf_counter()
      for _ in range(args.window_steps):
        state, _ = trainer.train_step(state, batch)
      jax.block_until_ready(state.step)
      jax_times.append((time.perf_counter() - start) / args.window_steps)
      start = time.perf_counter()
      for _ in range(args.window_steps):
        torch_step()
      torch_times.append((time.perf_counter() - start) / args.window_steps)
  tokens = t.batch_size * t.seq_len
  jm, tm = float(np.median(jax_times)), float(np.median(torch_times))
  out = {"batch": t.batch_size, "seq_len": t.seq_len, "dtype": m.dtype,
         "jax_devices": jax.device_count(),
         "rounds": args.rounds, "window_steps": args.window_steps,
         "jax_first_step_s": first_jax, "jax_median_step_s": jm,
         "torch_median_step_s": tm, "jax_tokens_per_s": tokens / jm,
         "torch_tokens_per_s": tokens / tm, "ratio": tm / jm,
         "round_ratios": [b / a for a, b in zip(jax_times, torch_times)],
         "jax_step_s": jax_times, "torch_step_s": torch_times}
  print(f"JAX   {jm:.3f} s/step on {jax.device_count()} device(s),  {tokens / jm:,.0f} tokens/s (first step {first_jax:.1f} s)")
  print(f"torch {tm:.3f} s/step  {tokens / tm:,.0f} tokens/s")
  print(f"ratio {tm / jm:.2f}x (per round: "
        f"{', '.join(f'{r:.2f}' for r in out['round_ratios'])})")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
