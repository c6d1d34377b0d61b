"""Scaling tables of the train step on this host, one process, one row at a time:
step time, tokens/s and MFU against sequence length, model size, objective and dtype.

  python benchmarks/scaling.py [--tables seq,size,objective,dtype] [--json PATH]

Every row is `amos-bench`'s measurement (`amos_jax.train.bench.run`: compile, one
warm-up step, --windows windows of --window_steps steps with one sync each; the
matmul peak timed in the same run in the row's dtype). Tables:
  seq:       ELECTRA-small, batch 8, sequence 128 / 256 / 512
  size:      ELECTRA small / base, batch 8 x 128
  objective: MLM / ELECTRA / AMOS at the small discriminator, batch 8 x 128
  dtype:     ELECTRA-small, batch 32 x 128, float32 / bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TABLES = {
    "seq": [("configs/electra.py:small", {"train.batch_size": 8, "train.seq_len": t})
            for t in (128, 256, 512)],
    "size": [(f"configs/electra.py:{s}", {"train.batch_size": 8, "train.seq_len": 128})
             for s in ("small", "base")],
    "objective": [(f"configs/{o}.py:small", {"train.batch_size": 8, "train.seq_len": 128})
                  for o in ("mlm", "electra", "amos")],
    "dtype": [("configs/electra.py:small", {"train.batch_size": 32, "train.seq_len": 128,
                                             "model.dtype": d})
              for d in ("float32", "bfloat16")],
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tables", default=",".join(TABLES))
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--window_steps", type=int, default=2)
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  from amos_jax import config as config_lib
  from amos_jax.train import bench
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  args = bench._parser().parse_args(["--windows", str(a.windows),
                                     "--window_steps", str(a.window_steps)])
  rows = []
  for table in a.tables.split(","):
    print(f"\n### {table}\n\n| config | overrides | step median (min..max) | tokens/s | "
          f"compile (lower + compile) | model GFLOP/step | matmul peak | MFU |\n"
          f"| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for path, overrides in TABLES[table]:
      config = config_lib.load_config_file(path)
      config_lib.apply_overrides(config, [(k, str(v)) for k, v in overrides.items()])
      out = bench.run(config_lib.freeze(config), args)
      out.update(table=table, config_file=path, overrides=overrides)
      rows.append(out)
      print(f"| {path.split('/')[-1]} | {', '.join(f'{k}={v}' for k, v in overrides.items())} "
            f"| {out['step_seconds_median']:.3f} s ({out['step_seconds_min']:.3f}.."
            f"{out['step_seconds_max']:.3f}) | {out['tokens_per_second']:.0f} | "
            f"{out['lower_seconds'] + out['compile_seconds']:.1f} s | "
            f"{out['model_flops_per_step'] / 1e9:.1f} | "
            f"{out['matmul_peak_flops'] / 1e9:.0f} GFLOP/s | "
            f"{100 * out['mfu_vs_measured_matmul']:.1f}% |", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1, default=str)
  return rows


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
