"""How long a run waits for its first step, piece by piece, in a fresh process.

  python benchmarks/first_step.py --config configs/electra.py:small \
      --config.train.batch_size=32 --config.train.seq_len=128 [--cache DIR]

Times, from the process's start: building the sharded model and optimizer state
(`build_trainer`: trace, compile and run the initializer), lowering and compiling
the train step, and running one step, and prints one line. --cache points JAX's
persistent compilation cache at DIR first, as `amos-train` does with
`train.compilation_cache_dir` (run twice to see a warm cache). Run it in separate
processes, alternating the variants compared: what it measures is first-time work.
"""
import time

START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax import hostmem
  from amos_jax.cli import split_config_overrides
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--cache", default="", help="persistent compilation cache directory")
  args = p.parse_args(rest)
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  config = config_lib.freeze(config)
  from amos_jax.train import compile_cache
  compile_cache.enable(args.cache)
  from amos_jax import hostcpu
  hostcpu.split_host(1)
  import jax
  from amos_jax.objectives import get_objective
  from amos_jax.train import aot, bench
  from amos_jax.train import sharding as shd
  trainer, state_seconds = bench.timed_build(get_objective(config),
                                             shd.build_mesh(config.mesh))
  batch = jax.device_put(bench.random_batch(config), trainer.batch_sharding)
  compiled, t = aot.lower_and_compile(trainer.train_step, (trainer.state, batch))
  start = time.perf_counter()
  state, metrics = compiled(trainer.state, batch)
  jax.block_until_ready(state)
  step_seconds = time.perf_counter() - start
  print(f"state {state_seconds:.2f} s | step lowering {t['lower_seconds']:.2f} s | "
        f"compile {t['compile_seconds']:.2f} s | first step {step_seconds:.2f} s | loss "
        f"{float(metrics['loss']):.6f} | process start to first step done "
        f"{time.perf_counter() - START:.2f} s", flush=True)


if __name__ == "__main__":
  main()
