"""Logical axis names for parameters and activations.

Every parameter is born with logical names (`vocab`, `embed`, `mlp`, `heads`, ...);
one rules table (the config's `sharding.rules`) maps them to mesh axes. The model
never names a mesh axis itself: parallelism is a config edit.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import flax
import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from amos_jax.model import deferred_init

# Variables carry their logical names as metadata only; shardings are applied by the
# trainer (jit out_shardings), never eagerly at construction.
flax.config.update("flax_always_shard_variable", False)

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "amos_jax_logical_rules", default=None)


def with_logical_axes(init, axes: LogicalAxes):
  """Wraps an initializer so the created Param carries logical axis names (and its
  draw can be deferred and batched over layers: `deferred_init`)."""
  return nnx.with_partitioning(deferred_init.deferrable(init), axes)


def logical_to_mesh(axes: LogicalAxes | None, rules: Rules) -> P:
  """Maps logical names to a PartitionSpec; a mesh axis is used at most once."""
  if axes is None:
    return P()
  table = {name: target for name, target in rules}
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*spec)


@contextlib.contextmanager
def axis_rules(rules: Rules):
  """Activates a rules table for `constrain` while tracing a step."""
  token = _RULES.set(tuple((k, v) for k, v in rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh + rules context
  and inside `shard_map` (manual axes: each device holds its own block)."""
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty or mesh.are_all_axes_manual:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(axes, rules))


def mesh_platform(mesh=None) -> str:
  """The platform of the mesh's devices (default: the current abstract mesh's): a
  step for a TPU topology compiled ahead of time on a CPU host is TPU's. Outside a
  mesh, the default backend's."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def custom_call_partitioned(mesh=None) -> str:
  """Why XLA may partition a program here, '' where it runs whole on each device.

  A CPU custom call of ours (`native_lib`) cannot be split by XLA: under a mesh
  with an automatically sharded axis of more than one device, or outside a mesh on
  several devices (arguments' shardings can partition the program there), XLA
  would gather its operands and run it whole everywhere. Inside `shard_map` (the
  one-all-reduce step), where each device computes its own block, it runs.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  split = {a: n for a, n in mesh.shape.items() if n > 1 and a not in mesh.manual_axes}
  if split:
    return (f"the mesh shards {split} automatically and XLA cannot split a custom "
            "call (sharding.grad_allreduce=once runs it per device)")
  if mesh.empty and jax.device_count() > 1:
    return f"a program outside a mesh may be partitioned over {jax.device_count()} devices"
  return ""
