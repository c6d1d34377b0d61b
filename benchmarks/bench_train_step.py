"""Train-step throughput of a config: median step time and tokens/s.

  python benchmarks/bench_train_step.py --config configs/electra.py:small \
      --batch_size 32 --seq_len 128 --steps 10

Random token batches (no data loading): the number is the step's own cost. The
first call (compilation) is timed separately and excluded from the median.
"""
from __future__ import annotations

import argparse
import json
import time

import jax

from amos_jax.train.distributed import skip_absent_tpu
import numpy as np


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--set", action="append", default=[],
                 help="config overrides KEY=VALUE (python literal)")
  args = p.parse_args(argv)
  skip_absent_tpu()

  import ast
  from amos_jax import config as config_lib
  from amos_jax.model.partitioning import axis_rules
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train.step import build_trainer

  config = config_lib.load_config_file(args.config)
  config.train.batch_size, config.train.seq_len = args.batch_size, args.seq_len
  config.model.max_position_embeddings = max(config.model.max_position_embeddings,
                                             args.seq_len)
  for item in args.set:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = ast.literal_eval(value)
  config_lib.validate(config, jax.device_count())
  mesh = shd.build_mesh(config.mesh)
  trainer = build_trainer(get_objective(config), mesh)
  state, batch_sh, step = trainer.state, trainer.batch_sharding, trainer.train_step
  rng = np.random.default_rng(0)
  b, t = args.batch_size, args.seq_len
  ids = rng.integers(5, config.model.vocab_size, (b, t), dtype=np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  batch = {"input_ids": ids, "segment_ids": np.ones_like(ids),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "token_type_ids": np.zeros_like(ids)}
  batch = jax.device_put(batch, batch_sh)
  times = []
  with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  out = {"config": args.config, "objective": config.objective.name,
         "params_M": round(n_params / 1e6, 2), "batch": b, "seq_len": t,
         "first_step_s": round(compile_s, 2), "median_step_s": round(med, 4),
         "min_step_s": round(min(times), 4), "tokens_per_s": round(b * t / med, 1),
         "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
         "loss": float(m["loss"])}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
