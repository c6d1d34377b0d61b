"""Checkpoint save (blocking part vs total) and restore time of a config's train state.

python benchmarks/checkpoint_timing.py --config configs/electra.py:base --dir /tmp/ckpt

--dir takes any path amos-train takes (gs://bucket/x with Application Default
Credentials). --emulator starts the tests' local Cloud Storage emulator (loopback, in
memory; its figures are not those of real Cloud Storage) and points --dir's bucket at it:
python benchmarks/checkpoint_timing.py --dir gs://amos-bench/ckpt --emulator
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from amos_jax.train.distributed import skip_absent_tpu

from amos_jax import paths
from amos_jax.config import load_config_file
from amos_jax.objectives import get_objective
from amos_jax.train import checkpoint as ckpt
from amos_jax.train import sharding as shd
from amos_jax.train.state import create_train_state_and_form, make_optimizer


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/electra.py:base")
  p.add_argument("--dir", default="/tmp/amos_ckpt_timing")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--emulator", action="store_true",
                 help="serve --dir's gs:// bucket from tests/gcs_emulator.py on 127.0.0.1")
  args = p.parse_args()
  emulator = None
  if args.emulator:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests import gcs_emulator
    emulator, port = gcs_emulator.start(args.dir.split("://", 1)[1].split("/", 1)[0])
    gcs_emulator.use_in_this_process(port)
  skip_absent_tpu()
  config = load_config_file(args.config)
  objective = get_objective(config)
  mesh = shd.build_mesh(config.mesh)
  tx = make_optimizer(config.train)
  # As the trainer saves: the layer-stacked state converted to the per-layer form
  # checkpoints hold (timed with the save), and stacked again after a restore.
  _, state, _, form = create_train_state_and_form(objective, mesh, tx)
  jax.block_until_ready(state)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  if paths.exists(args.dir):
    paths.as_path(args.dir).rmtree()
  manager = ckpt.make_manager(args.dir, config)
  for i in range(args.repeats):
    step = 1000 * (i + 1)
    start = time.perf_counter()
    ckpt.save(manager, step, state, force=True, convert=form.to_checkpoint)
    blocking = time.perf_counter() - start
    manager.wait_until_finished()
    total = time.perf_counter() - start
    print(f"save step {step}: {size / 2**20:.0f} MiB, blocking {blocking:.2f} s, "
          f"total {total:.2f} s")
  for _ in range(args.repeats):
    start = time.perf_counter()
    _, restored = ckpt.restore(manager, form.abstract)
    jax.block_until_ready(form.from_checkpoint(restored))
    print(f"restore: {time.perf_counter() - start:.2f} s")
  manager.close()
  if emulator is not None:
    emulator.kill()


if __name__ == "__main__":
  main()
