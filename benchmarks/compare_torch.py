"""The JAX ELECTRA step against the transformers + torch recipe at the same sizes,
alternating in one process so that machine drift cancels; prints the ratio.

  python benchmarks/compare_torch.py --config configs/electra.py:small \
      --config.train.batch_size=32 --config.train.seq_len=128 --rounds 5

Both are built (and the JAX step compiled) once; then each round times one window
of --window_steps steps of JAX (one sync at the end) and one of torch. The ratio is
of the medians over rounds; the per-round ratios show the spread. Sizes, batch,
sequence length and dropout come from the JAX config (an ELECTRA config).

With AMOS_JAX_CPU_PROCESSES=N (as amos-train takes it) the JAX step runs as N
data-parallel processes on blocks of cores (amos_jax/hostcpu.py), each
with its share of the batch; this process tells them when to step (they idle
while torch steps, which keeps every core) and times each window from its order
to the last process's reply.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jax_trainer(config):
  """(trainer, mesh, batch): the trainer's step and its random batch (this process's
  rows of it in a multi-process run)."""
  import jax
  from amos_jax import config as config_lib
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train.bench import process_random_batch
  from amos_jax.train.step import build_trainer
  config_lib.validate(config, jax.device_count())
  mesh = shd.build_mesh(config.mesh)
  trainer = build_trainer(get_objective(config), mesh)
  return trainer, mesh, process_random_batch(config, trainer.batch_sharding)


def _in_process(config, window_steps):
  """(window(): seconds of window_steps JAX steps, first step's seconds, devices)."""
  from amos_jax import hostcpu
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  hostcpu.split_host(1)  # as amos-train: AMOS_JAX_CPU_DEVICES=N to split
  import jax
  from amos_jax.model.partitioning import axis_rules
  trainer, mesh, batch = _jax_trainer(config)
  box = [trainer.state]

  def window():
    with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
      start = time.perf_counter()
      for _ in range(window_steps):
        box[0], _ = trainer.train_step(box[0], batch)
      jax.block_until_ready(box[0].step)
      return time.perf_counter() - start

  first = window() / window_steps  # compile + first steps
  return window, first, jax.device_count()


_REPLY = "jax-worker: "


def _worker_processes(count, argv, window_steps):
  """As _in_process, the JAX step run by `count` processes (hostcpu)."""
  import subprocess
  from amos_jax import hostcpu
  procs = hostcpu.start_processes(
      count, [sys.executable, os.path.abspath(__file__), "--jax_worker", *argv],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def reply(p):
    # The worker's own lines carry the prefix (gloo prints to stdout too).
    for line in p.stdout:
      if line.startswith(_REPLY):
        return line[len(_REPLY):]
    raise SystemExit("compare_torch.py: a JAX worker process ended; see its stderr")

  def replies():
    return [reply(p) for p in procs]

  def window():
    start = time.perf_counter()
    for p in procs:
      p.stdin.write("step\n")
      p.stdin.flush()
    replies()
    return time.perf_counter() - start

  first = float(replies()[0])  # process 0's compile + first window
  return window, first, count


def jax_worker(config, window_steps):
  """One process of the multi-process JAX step: one window per `step` line read."""
  from amos_jax import hostcpu
  from amos_jax.train.distributed import maybe_initialize_distributed
  maybe_initialize_distributed()   # process 0 then compiles for all, as in amos-train
  window, first, _ = _in_process(config, window_steps)
  hostcpu.settle_on_cores()   # compiled: process 0 settles on its cores
  print(f"{_REPLY}{first:.6f}", flush=True)
  for line in sys.stdin:
    if line.strip() == "step":
      print(f"{_REPLY}{window():.6f}", flush=True)


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = split_config_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--window_steps", type=int, default=1)
  p.add_argument("--json", default="")
  p.add_argument("--jax_worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(rest)
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  config = config_lib.freeze(config)
  if config.objective.name != "electra":
    raise SystemExit("compare_torch.py compares the ELECTRA recipe: use configs/electra.py")
  if args.jax_worker:
    return jax_worker(config, args.window_steps)

  from amos_jax import hostcpu
  processes = hostcpu.processes_to_start()
  if processes > 1:
    jax_window, first_jax, devices = _worker_processes(processes, argv, args.window_steps)
  else:
    jax_window, first_jax, devices = _in_process(config, args.window_steps)
  from benchmarks.torch_electra_baseline import make_step
  m, t = config.model, config.train
  torch_step = make_step(t.batch_size, t.seq_len, dict(
      vocab_size=m.vocab_size, embedding_size=m.embedding_size or m.hidden_size,
      hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
      intermediate_size=m.intermediate_size,
      generator_fraction=config.objective.generator.width_fraction,
      max_position_embeddings=m.max_position_embeddings, hidden_dropout=m.hidden_dropout,
      attention_dropout=m.attention_dropout))
  torch_step()  # warm-up
  jax_times, torch_times = [], []
  for _ in range(args.rounds):
    jax_times.append(jax_window() / args.window_steps)
    start = time.perf_counter()
    for _ in range(args.window_steps):
      torch_step()
    torch_times.append((time.perf_counter() - start) / args.window_steps)
  tokens = t.batch_size * t.seq_len
  jm, tm = float(np.median(jax_times)), float(np.median(torch_times))
  out = {"batch": t.batch_size, "seq_len": t.seq_len, "dtype": m.dtype,
         "jax_devices": devices, "jax_processes": processes,
         "rounds": args.rounds, "window_steps": args.window_steps,
         "jax_first_step_s": first_jax, "jax_median_step_s": jm,
         "torch_median_step_s": tm, "jax_tokens_per_s": tokens / jm,
         "torch_tokens_per_s": tokens / tm, "ratio": tm / jm,
         "round_ratios": [b / a for a, b in zip(jax_times, torch_times)],
         "jax_step_s": jax_times, "torch_step_s": torch_times}
  print(f"JAX   {jm:.3f} s/step on {devices} device(s) in {processes} process(es),  {tokens / jm:,.0f} tokens/s (first step {first_jax:.1f} s)")
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
