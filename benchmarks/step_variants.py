"""Compile time and step time of config variants of one train step, one process.

  python benchmarks/step_variants.py --config configs/electra.py:small \
      --base train.batch_size=32,train.seq_len=128 \
      --variants "|model.scan_layers=False|train.rng_impl=rbg|objective.sampler=gumbel" \
      [--rounds 6]

Each variant ('|'-separated; ';' joins several overrides; empty = the config as it
is) builds the trainer and compiles its jitted step (lowering + compilation, wall and
CPU seconds; `aot.lower_and_compile`). Then, because a shared machine's speed moves
by tens of percent within minutes, the variants run alternately: each round times one
window of --window_steps steps of every variant in turn (one warm-up step each first,
one sync per window; `bench.time_steps`). Prints each variant's median and spread
over rounds and its ratio to the first variant, median of the per-round ratios.
Run with XLA_FLAGS to compare XLA options (one process per flag set).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/electra.py:small")
  p.add_argument("--base", default="train.batch_size=32,train.seq_len=128")
  p.add_argument("--variants", default="")
  p.add_argument("--rounds", "--steps", dest="rounds", type=int, default=4)
  p.add_argument("--window_steps", type=int, default=1)
  a = p.parse_args(argv)
  from amos_jax import config as config_lib
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  import jax
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train import aot, bench
  from amos_jax.train.bench import random_batch
  from amos_jax.train.step import build_trainer
  base = [tuple(x.split("=", 1)) for x in a.base.split(",") if x]
  runs = []  # [name, compiled, state, batch, per-round seconds]
  for variant in a.variants.split("|"):
    overrides = [tuple(x.split("=", 1)) for x in variant.split(";") if x]
    config = config_lib.load_config_file(a.config)
    config_lib.apply_overrides(config, base + overrides)
    config = config_lib.freeze(config)
    trainer = build_trainer(get_objective(config), shd.build_mesh(config.mesh))
    batch = jax.device_put(random_batch(config), trainer.batch_sharding)
    compiled, t = aot.lower_and_compile(trainer.train_step, (trainer.state, batch))
    wall = t["lower_seconds"] + t["compile_seconds"]
    cpu = t["lower_cpu_seconds"] + t["compile_cpu_seconds"]
    name = variant or "(as configured)"
    print(f"{name:55s} compile {wall:5.1f} s ({cpu:5.1f} CPU)", flush=True)
    _, state, _ = bench.time_steps(compiled, trainer.state, batch, warmup=1,
                                   windows=0, window_steps=1)
    runs.append([name, compiled, state, batch, []])
  for _ in range(a.rounds):
    for run in runs:
      times, run[2], _ = bench.time_steps(run[1], run[2], run[3], warmup=0,
                                          windows=1, window_steps=a.window_steps)
      run[4].append(times[0])
  first = np.array(runs[0][4])
  for name, _, _, _, times in runs:
    ratio = np.median(np.array(times) / first)
    print(f"{name:55s} step median {np.median(times):.3f} s "
          f"({min(times):.3f} .. {max(times):.3f}), {ratio:.3f}x the first "
          f"(per round: {', '.join(f'{x:.3f}' for x in times)})", flush=True)


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
