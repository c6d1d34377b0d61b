"""Compile time of the real train step against depth, layers scanned or unrolled.

  python benchmarks/compile_vs_depth.py --config configs/electra.py:small \
      --layers 2,12 [--config.KEY=VALUE ...]

Lowers and compiles (nothing runs) the trainer's step for each depth and mode, in
one process, alternating the modes; reports wall and CPU seconds (CPU seconds are
what an idle machine would take: XLA compiles mostly on one thread). With
`--config.mesh.topology=v5p:...` the compiles are ahead of time for that pod.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--layers", default="2,12", help="discriminator depths")
  p.add_argument("--modes", default="scan,unrolled")
  args = p.parse_args(rest)
  from amos_jax.train.distributed import skip_absent_tpu
  from amos_jax.train.loop import compile_train_step
  rows = []
  for depth in (int(x) for x in args.layers.split(",")):
    for mode in args.modes.split(","):
      config = config_lib.load_config_file(args.config)
      config_lib.apply_overrides(config, overrides)
      config.model.num_layers = depth
      config.model.scan_layers = mode == "scan"
      if not config.mesh.get("topology"):
        skip_absent_tpu()
      r = compile_train_step(config_lib.freeze(config))
      row = {"layers": depth, "mode": mode, **{k: r[k] for k in (
          "lower_seconds", "compile_seconds", "lower_cpu_seconds", "compile_cpu_seconds",
          "total_bytes", "temp_bytes")}, "device_kind": r["device_kind"],
          "devices": r["devices"]}
      rows.append(row)
      print(f"{depth:>3} layers {mode:<9} lowering {row['lower_seconds']:7.2f} s "
            f"({row['lower_cpu_seconds']:.2f} CPU)  compile {row['compile_seconds']:7.2f} s "
            f"({row['compile_cpu_seconds']:.2f} CPU)  memory/device "
            f"{row['total_bytes'] / 2**30:.2f} GiB", flush=True)
  print(json.dumps(rows))
  return rows


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
