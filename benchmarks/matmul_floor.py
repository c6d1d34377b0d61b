"""The train step's matrix products timed alone: the floor under the step's time.

  python benchmarks/matmul_floor.py --config configs/electra.py:small \
      --config.train.batch_size=32 --config.train.seq_len=128 [--torch] [--rounds 5]

Compiles the trainer's step as amos-bench does and times it (median of --rounds
windows). Then it reads every `dot` of the compiled program with how often one step
runs it (`bench.hlo_dots`: the layer loops' trip counts), and times each alone,
jitted, at the same shapes and dimension numbers from row-major operands (median
of --rounds runs, each the best of 3 calls). With --torch, the same products through
`torch.einsum`, the kernels the transformers recipe runs, timed the same way and
interleaved with ours.

Prints one row per distinct product (shape, executions per step, FLOPs, time,
FLOP/s) and the sums: the time of the step's matrix products alone beside the
step's time and the matmul peak measured in the same run. The difference is what
everything else costs (elementwise ops, layout copies, the loops' bookkeeping), and
the sum is a floor no schedule of these kernels can beat.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def einsum_spec(dot) -> str:
  """The einsum subscripts of a `bench.Dot` (output: batch, lhs free, rhs free)."""
  lhs = list(_LETTERS[:len(dot.lhs)])
  rhs = list(_LETTERS[len(dot.lhs):len(dot.lhs) + len(dot.rhs)])
  for i, j in zip(*dot.contracting):
    rhs[j] = lhs[i]
  for i, j in zip(*dot.batch):
    rhs[j] = lhs[i]
  out = [lhs[i] for i in dot.batch[0]]
  out += [c for i, c in enumerate(lhs) if i not in dot.batch[0] + dot.contracting[0]]
  out += [c for i, c in enumerate(rhs) if i not in dot.batch[1] + dot.contracting[1]]
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def _best_of(fn, calls: int = 3) -> float:
  best = float("inf")
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  from amos_jax.errors import ConfigError
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--torch", action="store_true",
                 help="also time each product with torch.einsum")
  p.add_argument("--json", default="")
  args = p.parse_args(rest)
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  config = config_lib.freeze(config)

  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  import jax
  import jax.numpy as jnp
  from amos_jax.objectives import get_objective
  from amos_jax.train import aot, bench
  from amos_jax.train import sharding as shd
  from amos_jax.train.step import build_trainer
  config_lib.validate(config, jax.device_count())
  trainer = build_trainer(get_objective(config), shd.build_mesh(config.mesh))
  batch = jax.device_put(bench.random_batch(config), trainer.batch_sharding)
  compiled, _ = aot.lower_and_compile(trainer.train_step, (trainer.state, batch))
  step_times, _, _ = bench.time_steps(compiled, trainer.state, batch, warmup=1,
                                      windows=args.rounds, window_steps=1)
  try:
    dots = bench.hlo_dots(compiled.as_text())
  except ValueError as e:  # a loop without a trip count, a conditional
    raise ConfigError(f"matmul_floor.py cannot count this step's products: {e}") from e

  rng = np.random.default_rng(0)
  runs = []  # (dot, jitted call, torch call or None)
  for d in dots:
    a = jnp.asarray(rng.standard_normal(d.lhs, np.float32)).astype(d.dtype)
    b = jnp.asarray(rng.standard_normal(d.rhs, np.float32)).astype(d.dtype)
    f = jax.jit(lambda x, y, d=d: jax.lax.dot_general(
        x, y, (d.contracting, d.batch), preferred_element_type=d.out_dtype))
    f(a, b).block_until_ready()
    call = lambda f=f, a=a, b=b: f(a, b).block_until_ready()
    torch_call = None
    if args.torch:
      import torch
      ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
      spec = einsum_spec(d)
      torch_call = lambda spec=spec, ta=ta, tb=tb: torch.einsum(spec, ta, tb)
      torch_call()
    runs.append((d, call, torch_call))
  xla = np.zeros((args.rounds, len(runs)))
  tch = np.zeros((args.rounds, len(runs)))
  for r in range(args.rounds):
    for i, (_, call, torch_call) in enumerate(runs):
      xla[r, i] = _best_of(call)
      if torch_call is not None:
        tch[r, i] = _best_of(torch_call)
  xla_s, torch_s = np.median(xla, axis=0), np.median(tch, axis=0)
  counts = np.array([d.count for d in dots])
  flops = np.array([d.flops for d in dots], dtype=np.float64)
  peak = bench.matmul_peak("float32", 2048)
  step = float(np.median(step_times))

  order = np.argsort(-(xla_s * counts))
  head = "| product (lhs x rhs, contracting, batch) | per step | GFLOP | XLA ms | XLA GFLOP/s |"
  print(head + (" torch ms | torch GFLOP/s |" if args.torch else ""))
  print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.torch else ""))
  for i in order:
    d = dots[i]
    row = (f"| {d.lhs} x {d.rhs}, {d.contracting}, {d.batch} | {d.count} | "
           f"{flops[i] * counts[i] / 1e9:.2f} | {xla_s[i] * counts[i] * 1e3:.1f} | "
           f"{flops[i] / xla_s[i] / 1e9:.0f} |")
    if args.torch:
      row += f" {torch_s[i] * counts[i] * 1e3:.1f} | {flops[i] / torch_s[i] / 1e9:.0f} |"
    print(row)
  total_flops = float(flops @ counts)
  xla_total = float(xla_s @ counts)
  out = {"step_s": step, "step_s_rounds": step_times, "dot_flops": total_flops,
         "dots_alone_xla_s": xla_total, "matmul_peak_flops": peak,
         "distinct_products": len(dots), "products_per_step": int(counts.sum())}
  print(f"step {step:.3f} s; its {int(counts.sum())} matrix products "
        f"({total_flops / 1e9:.1f} GFLOP) alone in XLA: {xla_total:.3f} s "
        f"({total_flops / xla_total / 1e9:.0f} GFLOP/s, {xla_total / step:.0%} of the "
        f"step); matmul peak {peak / 1e9:.0f} GFLOP/s (the products at peak: "
        f"{total_flops / peak:.3f} s)")
  if args.torch:
    torch_total = float(torch_s @ counts)
    out["dots_alone_torch_s"] = torch_total
    print(f"the same products in torch.einsum: {torch_total:.3f} s "
          f"({total_flops / torch_total / 1e9:.0f} GFLOP/s)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  from amos_jax import hostmem
  from amos_jax.cli import run_command
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)

  def command():  # main returns the figures to Python callers; here the status is 0
    main()

  sys.exit(run_command(command))  # an AmosError as one `error:` line, as amos-bench
