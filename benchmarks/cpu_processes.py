"""One process per core against one process on all cores: the train step on a CPU host.

  python benchmarks/cpu_processes.py --config configs/electra.py:small \
      --base train.batch_size=32,train.seq_len=128 [--processes 2] [--rounds 3]

XLA's CPU backend splits each kernel over the host's cores, and at ELECTRA-small's
sizes a product split over two cores runs well below twice its one-core speed.
Data-parallel processes pinned one per core (`jax.distributed` on localhost, gloo
collectives) each run their share of the batch single-threaded instead, and pay
for the gradients' all-reduce. Each round starts, in turn, fresh processes for:

  one       one process, every core, the whole batch;
  per_layer N pinned processes, the partitioner's all-reduces (per layer, in the
            layer scan: `sharding.grad_allreduce=per_layer`);
  once      N pinned processes, one flat all-reduce per step (`once`, what `auto`
            picks for them).

Each times --steps steps after a warm-up step (one sync per step) and reports the
median. Prints each mode's median over rounds and its ratio to `one`, the median
of the per-round ratios (machine drift between rounds cancels), and the first
step's loss, the same in every mode up to the order of the sums.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(a) -> None:
  """One process of a mode: build, compile, time; process 0 prints one JSON line."""
  from amos_jax import config as config_lib
  from amos_jax.train.distributed import maybe_initialize_distributed, skip_absent_tpu
  skip_absent_tpu()
  maybe_initialize_distributed()
  import jax
  from amos_jax.model.partitioning import axis_rules
  from amos_jax.objectives import get_objective
  from amos_jax.train import aot, bench
  from amos_jax.train import sharding as shd
  from amos_jax.train.step import build_trainer
  config = config_lib.load_config_file(a.config)
  overrides = [tuple(x.split("=", 1)) for x in a.base.split(",") if x]
  config_lib.apply_overrides(config, overrides + [("sharding.grad_allreduce", a.reduce)])
  config = config_lib.freeze(config)
  mesh = shd.build_mesh(config.mesh)
  trainer = build_trainer(get_objective(config), mesh)
  batch = bench.process_random_batch(config, trainer.batch_sharding)
  # As the trainer runs its step: traced under the mesh and the rules table.
  with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
    start = time.perf_counter()
    compiled, _ = aot.lower_and_compile(trainer.train_step, (trainer.state, batch))
    compile_s = time.perf_counter() - start
    state, metrics = compiled(trainer.state, batch)
    loss = float(jax.device_get(metrics["loss"]))
    times, _, _ = bench.time_steps(compiled, state, batch, warmup=0, windows=a.steps,
                                   window_steps=1)
  if jax.process_index() == 0:
    print(json.dumps(dict(step=float(np.median(times)), compile=compile_s, loss=loss)),
          flush=True)


def run_mode(a, mode: str) -> dict:
  """Starts the mode's processes, waits for them; process 0's JSON line."""
  from amos_jax import hostcpu, hostmem
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.update(hostmem.huge_pages_environment(env) or {})
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "AMOS_JAX_CPU_DEVICES"):
    env.pop(key, None)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", a.config,
         "--steps", str(a.steps), "--reduce", "auto" if mode == "one" else mode]
  pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if mode == "one":
    procs = [subprocess.Popen(cmd + ["--base", a.base], env=env, **pipes)]
  else:  # as amos-train under AMOS_JAX_CPU_PROCESSES
    procs = hostcpu.start_processes(
        a.processes, cmd + ["--base", a.base + f",mesh.data={a.processes}"], env, **pipes)
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise SystemExit(f"{mode}: a process failed:\n{err[-3000:]}")
  return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/electra.py:small")
  p.add_argument("--base", default="train.batch_size=32,train.seq_len=128")
  p.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--modes", default="one,per_layer,once")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--reduce", default="auto", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    return worker(a)
  modes = a.modes.split(",")
  results = {m: [] for m in modes}
  for r in range(a.rounds):
    for mode in modes:
      out = run_mode(a, mode)
      results[mode].append(out)
      print(f"round {r + 1} {mode:9s} step {out['step']:.3f} s  compile "
            f"{out['compile']:5.1f} s  first loss {out['loss']:.6f}", flush=True)
  print(f"\n{a.config} {a.base}, {a.processes} processes, {a.rounds} rounds x "
        f"{a.steps} steps")
  base = [o["step"] for o in results[modes[0]]]
  for mode in modes:
    steps = [o["step"] for o in results[mode]]
    ratios = [s / b for s, b in zip(steps, base)]
    print(f"{mode:9s} median {np.median(steps):.3f} s ({min(steps):.3f} .. "
          f"{max(steps):.3f})  ratio to {modes[0]} {np.median(ratios):.3f} "
          f"(per round {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
  main()
