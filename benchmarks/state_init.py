"""Time to build the sharded train state against depth: deferred draws vs per layer.

  python benchmarks/state_init.py --config configs/electra.py:small \
      --layers 2,12,24 [--rounds 2] [--config.KEY=VALUE ...]

For each depth, in one process and alternating, times (trace, compile, run; no
compilation cache) the trainer's state initializer (`create_train_state`: each
layer-stacked parameter drawn once, model/deferred_init.py) against the same state
built as the model builds itself inside jit (one draw per parameter and layer, the
initializer before the deferred draws), and checks that both hold the same
parameters bit for bit. Prints one line per depth and mode, medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--layers", default="2,12,24", help="discriminator depths")
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args(rest)
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train import state as state_lib
  from amos_jax.train.layer_groups import group

  def parts(depth):
    config = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(config, overrides)
    config.model.num_layers = depth
    config = config_lib.freeze(config)
    objective = get_objective(config)
    return objective, shd.build_mesh(config.mesh), state_lib.make_optimizer(config.train)

  def deferred(depth):
    objective, mesh, tx = parts(depth)
    return state_lib.create_train_state(objective, mesh, tx)[1]

  def per_layer(depth):
    objective, mesh, tx = parts(depth)
    state_sh = state_lib._init_and_shardings(objective, mesh, tx)[3]
    seed = objective.config.train.seed

    def init():
      params = group(nnx.split(objective.build_model(nnx.Rngs(seed)), nnx.Param)[1])
      return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params),
                                  nonfinite_streak=jnp.zeros((), jnp.int32))

    with jax.set_mesh(mesh):
      return jax.jit(init, out_shardings=state_sh,
                     compiler_options=shd.compiler_options(mesh))()

  times: dict[tuple[int, str], list[float]] = {}
  for r in range(args.rounds):
    for depth in (int(x) for x in args.layers.split(",")):
      states = {}
      for name, build in (("per layer", per_layer), ("deferred", deferred)):
        start = time.perf_counter()
        states[name] = jax.block_until_ready(build(depth))
        times.setdefault((depth, name), []).append(time.perf_counter() - start)
      same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
          jax.tree.leaves(states["per layer"]), jax.tree.leaves(states["deferred"])))
      print(f"round {r + 1}: {depth:>3} layers  per layer "
            f"{times[depth, 'per layer'][-1]:6.2f} s  deferred "
            f"{times[depth, 'deferred'][-1]:6.2f} s  same state: {same}", flush=True)
  for (depth, name), ts in times.items():
    print(f"{depth:>3} layers  {name:<9}  median {np.median(ts):6.2f} s "
          f"({', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
  main()
