"""Where a train step's wall time goes, by XLA kernel, from a `jax.profiler` trace.

  python benchmarks/step_profile.py --config configs/electra.py:small \
      [--steps 2] [--top 30] [--config.KEY=VALUE ...]

Compiles the step (`aot.lower_and_compile`, as amos-bench), runs warm-up steps,
then traces --steps steps and splits every moment of their wall time among the
kernels running then on XLA's threads (`amos_jax/train/step_profile.py`: equally
among those running at once; a moment with none running goes to the kernel that
ended last, as XLA:CPU's Eigen products run with no event of their own). Prints
milliseconds per step by kernel kind (the name without its numeric suffix), the top
kernels with their shapes and source operations from the compiled HLO, and the time
by HLO computation (the scanned layers' loop bodies apart).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=30)
  a = p.parse_args(rest)
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  import jax
  from amos_jax.objectives import get_objective
  from amos_jax.train import aot
  from amos_jax.train import sharding as shd
  from amos_jax.train.bench import random_batch, time_steps
  from amos_jax.train.step import build_trainer
  from amos_jax.train.step_profile import attribute, hlo_index, kind, trace_events
  config = config_lib.load_config_file(a.config)
  config_lib.apply_overrides(config, overrides)
  config = config_lib.freeze(config)
  trainer = build_trainer(get_objective(config), shd.build_mesh(config.mesh))
  batch = jax.device_put(random_batch(config), trainer.batch_sharding)
  compiled, _ = aot.lower_and_compile(trainer.train_step, (trainer.state, batch))
  _, state, _ = time_steps(compiled, trainer.state, batch, a.warmup, 0, 1)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(a.steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    events = trace_events(trace_dir)
  wall = attribute(events)
  span = max(e for _, e, _ in events) - min(s for s, _, _ in events)
  per_step = 1e3 / a.steps
  print(f"{a.config}: {span * per_step:.1f} ms per step traced, {len(events) // a.steps} "
        "kernel events per step")
  by_kind = collections.Counter()
  for name, seconds in wall.items():
    by_kind[kind(name)] += seconds
  print("\nms/step  kernel kind")
  for name, seconds in by_kind.most_common(a.top):
    print(f"{seconds * per_step:7.1f}  {name}")
  index = hlo_index(compiled.as_text())
  calls = collections.Counter(name for _, _, name in events)
  print("\nms/step  calls/step  kernel  shape  operation")
  for name, seconds in wall.most_common(a.top):
    shape, op, _ = index.get(name, ("?", "", ""))
    print(f"{seconds * per_step:7.1f}  {calls[name] / a.steps:10.0f}  {name}  {shape}  "
          f"{op.replace('jit(train_step)/', '')[-70:]}")
  by_computation = collections.Counter()
  for name, seconds in wall.items():
    by_computation[index.get(name, ("", "", "?"))[2]] += seconds
  print("\nms/step  HLO computation (a scanned layer loop's body runs once per layer)")
  for name, seconds in by_computation.most_common(8):
    print(f"{seconds * per_step:7.1f}  {name}")
  return wall


if __name__ == "__main__":
  main()
