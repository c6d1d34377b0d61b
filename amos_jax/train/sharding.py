"""Mesh from config, and shardings for parameters, optimizer state and batches.

Mesh axes are `config.MESH_AXES` ('data', 'fsdp', 'tensor'). Parameter and batch
shardings come from logical axis names through the config's rules table
(`amos_jax.model.partitioning.logical_to_mesh`); nothing here names a mesh axis.
"""
from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from amos_jax.config import MESH_AXES, resolve_mesh_shape
from amos_jax.model.partitioning import logical_to_mesh


def build_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh over MESH_AXES and `devices` (default: all), -1 filled."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # noqa: BLE001 - topology-unaware fallback (e.g. odd CPU counts)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def compiler_options(mesh: Mesh) -> dict:
  """XLA options for programs that run on `mesh`'s devices.

  On CPU, LLVM's optimization level 1 instead of the default 2: the ELECTRA-small
  step compiles about 15% faster and runs no slower (its time is in the matmul
  library calls and memory-bound fusions that O2 does not speed up), measured in
  BENCHMARKS.md. Level 0 halves the step speed. Other backends: XLA's defaults.
  """
  # jax_disable_most_optimizations (level 0) is the user asking for less: keep it.
  if (mesh.devices.flat[0].platform == "cpu"
      and not jax.config.read("jax_disable_most_optimizations")):
    return {"xla_backend_optimization_level": 1}
  return {}


def batch_spec(rules) -> P:
  """Batches (B, ...): the leading axis placed by the rules table's `batch` entry."""
  return logical_to_mesh(("batch",), rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Batches (B, T) on `mesh`, as `batch_spec` places them."""
  return NamedSharding(mesh, batch_spec(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules) -> nnx.State:
  """The State of NamedShardings for params, from their logical axis metadata."""
  specs = nnx.get_partition_spec(abstract_params)
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, logical_to_mesh(tuple(spec), rules)), specs,
      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                        params_shardings, mesh: Mesh):
  """Moments are sharded like their parameters; counters are replicated."""
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))
