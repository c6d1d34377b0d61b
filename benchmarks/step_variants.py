"""Compile time and step time of config variants of one train step, one process.

  python benchmarks/step_variants.py --config configs/electra.py:small \
      --base train.batch_size=32,train.seq_len=128 \
      --variants "|model.scan_layers=False|train.rng_impl=rbg|objective.sampler=gumbel"

Each variant ('|'-separated; ';' joins several overrides; empty = the config as it
is) builds the trainer, compiles its jitted step (lowering + compilation, wall and
CPU seconds), runs one warm-up step and --steps timed steps with a sync after each
(`aot.lower_and_compile`, `bench.time_steps`);
prints the median and minimum step time. Run with XLA_FLAGS to compare XLA options.
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
  p.add_argument("--steps", type=int, default=4)
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
    times, _, _ = bench.time_steps(compiled, trainer.state, batch, warmup=1,
                                   windows=a.steps, window_steps=1)
    print(f"{variant or '(as configured)':55s} compile {wall:5.1f} s ({cpu:5.1f} CPU)  "
          f"step median {np.median(times):.3f} s, min {min(times):.3f} s", flush=True)


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
