"""One JAX device per CPU core, on a host that runs JAX on its CPU.

XLA's CPU backend runs a batched matrix product, such as attention's scores QK^T
and context PV over (batch, heads), on one core: it loops over the batch calling a
small matrix kernel that stays on one thread. JAX gives a CPU host one device. Split
into one device per core, with the batch split over them as the data axis, each
device runs its share of those products on its own core, while the large products
still use every core of the shared thread pool. On a 2-core host (BENCHMARKS.md,
"one device per core"): all-MiniLM-L6-v2 embedding takes 0.83-0.92 of its
one-device time, with identical embeddings, and the ELECTRA-small step went from
1.83x to 1.96x the transformers recipe (medians of five pairs of runs), at 2-3 s
more compilation.

The command-line tools call `split_host` before JAX starts its CPU client:

- `AMOS_JAX_CPU_DEVICES` unset or `auto`: one device per core this process may run
  on. amos-train and amos-bench take the largest count up to that which divides
  the per-process micro-batch, and split only a mesh whose one free (-1) axis carries
  the batch (the default `mesh.data=-1`); other meshes keep one device per process.
- `AMOS_JAX_CPU_DEVICES=N`: N devices (`1`: JAX's default, one device).
- A device count the user already gave JAX (`--xla_force_host_platform_device_count`
  in XLA_FLAGS, or JAX_NUM_CPU_DEVICES) is left as it is.

On a host with an accelerator the setting changes nothing the run uses: it sizes
only the CPU client, and the mesh is built over the accelerator's devices.
"""
from __future__ import annotations

import os

from amos_jax.errors import ConfigError

ENV = "AMOS_JAX_CPU_DEVICES"


def requested_devices(environ=None) -> int | None:
  """The count AMOS_JAX_CPU_DEVICES asks for; None for `auto` (or unset)."""
  environ = os.environ if environ is None else environ
  value = environ.get(ENV, "").strip().lower()
  if value in ("", "auto"):
    return None
  try:
    count = int(value)
  except ValueError:
    count = 0
  if count < 1:
    raise ConfigError(f"{ENV}={environ.get(ENV)!r} is not a device count; set it to a "
                      "positive integer (1: one CPU device) or to auto (one per core)")
  return count


def host_cores() -> int:
  """The cores this process may run on (its CPU affinity, as taskset sets it)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def device_count_was_given(environ=None) -> bool:
  """True where the user sized JAX's CPU client already (XLA_FLAGS or JAX's env)."""
  environ = os.environ if environ is None else environ
  return ("xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "")
          or bool(environ.get("JAX_NUM_CPU_DEVICES", "").strip()))


def largest_divisor_up_to(n: int, limit: int) -> int:
  """The largest d <= limit that divides n (n, limit >= 1)."""
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def devices_for_config(config, cores: int | None = None) -> int:
  """`auto`'s device count for a train config: one per core, as many as divide the
  per-process micro-batch, on a mesh whose one free axis carries the batch; else 1."""
  from amos_jax.config import MESH_AXES, batch_mesh_axes
  cores = host_cores() if cores is None else cores
  mesh = config.mesh
  free = [a for a in MESH_AXES if int(mesh[a]) == -1]
  fixed = [int(mesh[a]) for a in MESH_AXES if int(mesh[a]) != -1]
  if (len(free) != 1 or any(s != 1 for s in fixed)
      or free[0] not in batch_mesh_axes(config.sharding.rules)):
    return 1
  t = config.train
  micro = t.batch_size // max(1, t.grad_accum_steps)
  return largest_divisor_up_to(max(1, micro), cores)


def split_host(auto_count: int | None = None) -> int:
  """Sizes JAX's CPU client before it starts; returns the device count set, or 0
  where it left JAX alone (a count given by the user, one device, or a client that
  has started already: sizing it is only possible before that).

  auto_count: the count for `auto` (default: one per core).
  """
  import jax
  from jax._src import xla_bridge
  count = requested_devices()
  if count is None:
    if device_count_was_given():
      return 0
    count = host_cores() if auto_count is None else auto_count
  if count <= 1 or xla_bridge.backends_are_initialized():
    return 0
  jax.config.update("jax_num_cpu_devices", count)
  return count
