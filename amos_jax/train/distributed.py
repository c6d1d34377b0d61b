"""Joining the processes of a multi-host run with `jax.distributed`.

A run spans processes on a TPU pod (one process per host), on SLURM or Open MPI
GPU clusters (one process per GPU) and in tests (several CPU processes on
localhost). `maybe_initialize_distributed` must run before anything touches a JAX
backend; on a single process it does nothing, so one code path serves 1 CPU and a
pod alike.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from amos_jax.errors import ConfigError


# Stands for "more than one": the launcher said the run is shared without saying
# its size, which jax.distributed then finds itself.
_SHARED = 2


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  try:
    return int(value) if value else None
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _tpu_process_count() -> int | None:
  """Host count of the Cloud TPU slice(s) this VM belongs to; None off a TPU VM."""
  # Reads PCI ids from sysfs only: safe before any backend exists.
  from jax._src import hardware_utils
  num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  if num_chips == 0:
    return None
  slices = _int_env("MEGASCALE_NUM_SLICES") or 1
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES")
  if hostnames:  # GKE sets the worker list in the environment.
    return slices * len([h for h in hostnames.split(",") if h.strip()])
  # A TPU VM created with gcloud publishes its workers in the metadata server;
  # jax's own detector reads it. Private API: if it moves, initialize anyway and
  # let jax decide (a one-host slice then runs as a one-process cluster).
  try:
    from jax._src.clusters import cloud_tpu_cluster
    if cloud_tpu_cluster.GceTpuCluster.is_env_present():
      return cloud_tpu_cluster.GceTpuCluster.get_process_count()
  except Exception:  # pylint: disable=broad-except
    pass
  return _SHARED


def detect_process_count() -> int:
  """Number of processes the launcher started, from its environment; 1 if none."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    # A hand-rolled cluster: the address alone says the run is shared, and jax
    # finds the count in JAX_NUM_PROCESSES or a cluster detector.
    return _int_env("JAX_NUM_PROCESSES") or _SHARED
  # SLURM_STEP_NODELIST exists only inside an `srun` step: a process started
  # directly by the batch script must not wait for peers that never come.
  if "SLURM_STEP_NODELIST" in os.environ and "SLURM_PROCID" in os.environ:
    ntasks = _int_env("SLURM_STEP_NUM_TASKS") or _int_env("SLURM_NTASKS") or 1
    if ntasks > 1:
      return ntasks
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    size = _int_env("OMPI_COMM_WORLD_SIZE") or 1
    if size > 1:
      return size
  return _tpu_process_count() or 1


def skip_absent_tpu() -> None:
  """Keeps JAX from starting the TPU runtime on a machine without TPU chips.

  With `libtpu` installed (for `--compile_only` pod compiles) JAX otherwise probes
  the TPU runtime at start-up on any machine, which finds no chips and prints
  libtpu's banner of TPU_WORKER_HOSTNAMES errors. Nothing changes when platforms
  are set explicitly, when TPU chips are present, or when another accelerator
  plugin (CUDA, ROCm) is installed. Call before anything touches a JAX backend;
  compile-only pod topologies load libtpu themselves.
  """
  import importlib.metadata
  import importlib.util
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return
  try:
    from jax._src import hardware_utils
    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # noqa: BLE001 - cannot tell: leave JAX's own choice
    return
  if not chips:
    jax.config.update("jax_platforms", "cpu")


def _platform_may_be_cpu() -> bool:
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "cpu" in platforms.split(",")[0]


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> int:
  """Calls `jax.distributed.initialize` when the run spans processes.

  Explicit arguments win; the rest comes from the launcher's environment (Cloud
  TPU, SLURM under srun, Open MPI, or JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES / JAX_PROCESS_ID). Must be called before any JAX computation.
  Returns the number of processes (1 when nothing was initialized).
  """
  if jax.distributed.is_initialized():
    return jax.process_count()
  if num_processes is None:
    num_processes = _int_env("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_env("JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id, local_device_ids)
  if num_processes is not None:
    count = num_processes
  elif any(v is not None for v in explicit):
    count = _SHARED
  else:
    count = detect_process_count()
  if count < 1:
    raise ConfigError(f"num_processes={count} must be at least 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(
        f"process_id={process_id} must be in [0, num_processes={num_processes})")
  if count == 1:
    return 1
  if _platform_may_be_cpu() and "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    # Cross-process collectives on CPU need an implementation; without one a
    # psum over devices of two processes fails at run time, not at init.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout)
  # Processes that amos_jax started on one CPU host: process 0 compiles for all.
  from amos_jax import hostcpu
  hostcpu.share_compiles()
  return jax.process_count()


def is_primary() -> bool:
  """True on process 0, the one that writes metrics, logs and exports."""
  return jax.process_index() == 0
