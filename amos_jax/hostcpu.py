"""One JAX device per CPU core, on a host that runs JAX on its CPU.

XLA's CPU backend runs a batched matrix product, such as attention's scores QK^T
and context PV over (batch, heads), on one core: it loops over the batch calling a
small matrix kernel that stays on one thread. JAX gives a CPU host one device. Split
into one device per core, with the batch split over them as the data axis, each
device runs its share of those products on its own core, while the large products
still use every core of the shared thread pool. On a 2-core host (BENCHMARKS.md,
"one device per core"), all-MiniLM-L6-v2 embedding takes 0.83-0.92 of its
one-device time, with identical embeddings. Training gains less and not always
(the ELECTRA-small step 0.91-1.02 of its one-device time, AMOS-small 1.07-1.14),
and compiles 2-3 s longer, so training splits only when asked.

The command-line tools call `split_host` before JAX starts its CPU client:

- `AMOS_JAX_CPU_DEVICES` unset or `auto`: amos-eval (sts, retrieval, grid) and
  amos-index embed on one device per core this process may run on; amos-train,
  amos-bench and amos-eval glue keep one device.
- `AMOS_JAX_CPU_DEVICES=N`: N devices for every command (`1`: JAX's default). A
  train run splits its batch over them, so N must divide the micro-batch (the
  trainer's config check names the fix); multi-process runs keep theirs as is.
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


def split_host(auto_count: int | None = None) -> int:
  """Sizes JAX's CPU client before it starts; returns the device count set, or 0
  where it left JAX alone (a count given by the user, one device, or a client that
  has started already: sizing it is only possible before that).

  auto_count: the count for `auto` (default: one per core; training passes 1).
  """
  count = requested_devices()
  if count is None:
    if device_count_was_given():
      return 0
    count = host_cores() if auto_count is None else auto_count
  return count if count > 1 and size_cpu_client(count) else 0


def size_cpu_client(count: int) -> bool:
  """Asks JAX's CPU client for `count` devices (at least as many as asked before);
  False where the client has started and can no longer be sized."""
  import jax
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return False
  jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
  return True
