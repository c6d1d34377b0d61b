"""Ahead-of-time compiles: find an out-of-memory or a sharding error before a pod is booked.

A step is lowered and compiled for devices that need not exist: a TPU pod named by
its topology (through libtpu's compile-only client, on a CPU-only machine) or fake
CPU devices. XLA's memory analysis of the compiled step then gives what each device
would hold.
"""
from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from amos_jax.errors import ConfigError

# The libtpu release that jax==0.10.2 declares for its `tpu` extra; setup.py's test
# extra pins the same.
LIBTPU_VERSION = "0.0.42.1"
LIBTPU_MISSING = ("--config.mesh.topology needs the `libtpu` package: "
                  f"pip install libtpu=={LIBTPU_VERSION}")

# Memory per chip by `device_kind`, to say how full a compiled step leaves it.
HBM_BYTES = {
    "TPU v4": 32 << 30,
    "TPU v5 lite": 16 << 30,  # v5e
    "TPU v5": 95 << 30,  # v5p
    "TPU v6 lite": 32 << 30,  # v6e (Trillium)
}

_FIELDS = (  # (report key, CompiledMemoryStats attribute, row label)
    ("argument_bytes", "argument_size_in_bytes", "arguments"),
    ("output_bytes", "output_size_in_bytes", "outputs"),
    ("temp_bytes", "temp_size_in_bytes", "temporaries"),
    ("generated_code_bytes", "generated_code_size_in_bytes", "generated code"),
    ("alias_bytes", "alias_size_in_bytes", "aliased (donated)"),
)


def libtpu_available() -> bool:
  """True when a TPU runtime library can be loaded (libtpu package or TPU_LIBRARY_PATH)."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def topology_devices(topology_name: str, platform: str = "tpu") -> list[jax.Device]:
  """Compile-only devices of a pod named like "v5p:4x4x4" (chips per axis).

  They carry coordinates and process indices like the real pod's, so a Mesh over
  them compiles what the pod would run; they cannot execute anything.
  """
  if platform == "tpu" and not libtpu_available():
    raise ConfigError(LIBTPU_MISSING)
  from jax.experimental import topologies
  from jax._src import hardware_utils
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
    # Off a TPU VM, libtpu looks for its slice in these and prints five lines of
    # warnings when they are missing; compile-only devices come from the topology
    # name alone (the memory report is the same with or without them).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    return list(topologies.get_topology_desc(
        platform=platform, topology_name=topology_name).devices)
  except RuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "TPU support not installed" in first:
      raise ConfigError(LIBTPU_MISSING) from None
    raise ConfigError(
        f"--config.mesh.topology={topology_name!r} is not a {platform} topology "
        f"({first}); use a name like v5p:2x2x2 or v4:4x4x8") from None


def fake_cpu_devices(n: int) -> list[jax.Device]:
  """n CPU devices, made by the CPU client when it has not started yet.

  Tests and `--compile_only` without a topology use them to compile a multi-device
  step on one machine.
  """
  from amos_jax.hostcpu import size_cpu_client
  size_cpu_client(n)
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ConfigError(
        f"{n} CPU devices asked but JAX started with {len(devices)}: set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before the process starts")
  return devices[:n]


def lower_and_compile(jitted: Any, args: Sequence[Any]):
  """(compiled, timings) of a jitted function for `args` (arrays or
  jax.ShapeDtypeStruct pytrees). Timings: wall seconds of lowering and compiling,
  and this process's CPU seconds for each (on a shared machine, CPU seconds are
  what an idle one would take as wall time; XLA compiles mostly on one thread)."""
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = jitted.lower(*args)
  lowered_at, cpu_lowered = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  return compiled, {
      "lower_seconds": round(lowered_at - start, 3),
      "compile_seconds": round(time.perf_counter() - lowered_at, 3),
      "lower_cpu_seconds": round(cpu_lowered - cpu_start, 3),
      "compile_cpu_seconds": round(time.process_time() - cpu_lowered, 3)}


def cost_of(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program, per device: FLOPs and bytes accessed
  (an SPMD program is analysed as one device's partition). A while loop's body
  (e.g. the layer scan) is counted once, not once per iteration."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {"xla_flops": float(cost.get("flops", 0.0)),
          "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def lowered_cost(lowered) -> dict[str, float]:
  """HLO cost analysis of a lowered (not yet optimized) program: every matmul of
  every loop iteration counted once per iteration only when the loop is unrolled,
  and bytes counted before fusion (an upper bound)."""
  return cost_of(lowered)


def analyze(compiled) -> dict[str, Any]:
  """Bytes per device (arguments, outputs, temporaries, generated code, aliases and
  their total, an aliased output reusing a donated argument's buffer), XLA's FLOPs
  and bytes accessed, the device count and kind, and the chip's memory when known."""
  stats = compiled.memory_analysis()
  report: dict[str, Any] = {}
  for key, attr, _ in _FIELDS:
    report[key] = int(getattr(stats, attr, 0) or 0) if stats is not None else 0
  report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                           + report["temp_bytes"] + report["generated_code_bytes"]
                           - report["alias_bytes"])
  report.update(cost_of(compiled))
  devices = _devices_of(compiled)
  kind = devices[0].device_kind if devices else "unknown"
  report.update(devices=len(devices), device_kind=kind,
                platform=devices[0].platform if devices else "unknown",
                hbm_bytes=HBM_BYTES.get(kind))
  return report


def compile_and_report(jitted: Any, abstract_args: Sequence[Any]) -> dict[str, Any]:
  """Lowers and compiles a jitted function for `abstract_args`; measures it per device.

  jitted: the `jax.jit` object itself (the trainer's, with its shardings and
  donation), so what is measured is what runs. abstract_args are
  jax.ShapeDtypeStruct pytrees. Returns `analyze`'s report with the lowering and
  compile seconds.
  """
  compiled, timings = lower_and_compile(jitted, abstract_args)
  report = analyze(compiled)
  report.update(timings)
  return report


def _devices_of(compiled) -> list:
  """Devices the executable was compiled for, read from its input shardings."""
  devices = set()
  for sharding in jax.tree.leaves(compiled.input_shardings):
    devices |= set(sharding.device_set)
  for sharding in jax.tree.leaves(compiled.output_shardings):
    devices |= set(sharding.device_set)
  return sorted(devices, key=lambda d: d.id)


def _human(n: int) -> str:
  value = float(n)
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(value) < 1024 or unit == "GiB":
      return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
    value /= 1024
  return f"{value:.2f} GiB"


def format_memory_report(report: dict[str, Any], title: str = "") -> str:
  """The report as a table of bytes per device, for the console."""
  head = title or f"{report['devices']} x {report['device_kind']}"
  lines = [f"compiled {head} in {report['compile_seconds']:.2f} s "
           f"(lowering {report['lower_seconds']:.2f} s); memory per device:"]
  rows = [(label, report[key]) for key, _, label in _FIELDS]
  rows.append(("total", report["total_bytes"]))
  for label, value in rows:
    sign = "-" if label.startswith("aliased") and value else ""
    lines.append(f"  {label:<18} {sign + _human(value):>12} {value:>16,d}")
  if report.get("hbm_bytes"):
    share = report["total_bytes"] / report["hbm_bytes"]
    verdict = "fits" if share <= 1 else "DOES NOT FIT"
    lines.append(f"  {'chip memory':<18} {_human(report['hbm_bytes']):>12} "
                 f"{100 * share:>15.1f}% used, {verdict}")
  return "\n".join(lines)
