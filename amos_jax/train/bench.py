"""amos-bench: how close the train step runs to the hardware, and how long it compiles.

  amos-bench --config configs/X.py[:ARG] [--config.KEY=VALUE ...] [--json PATH]
  amos-bench --config configs/amos.py:base --config.mesh.topology=v5p:4x4x4 ...

On this host's devices: the trainer's own jitted step (`jit_train_step`) is lowered
and compiled (timed apart), warmed up, then timed in windows of several steps with
one host sync at the end of each window (no sync inside); step time is the median
over windows, with its spread. Tokens/s, the objective's analytic model FLOPs
(`Objective.model_flops`) beside XLA's `cost_analysis`, MFU against a matmul peak
measured in the same run, after every window (the best of them; and against the
datasheet peak on GPU/TPU), and memory.

With `mesh.topology` the step is compiled ahead of time for that pod (nothing
runs): memory, FLOPs and bytes per chip from the compiled program, and a roofline
ESTIMATE of step time and MFU at the chip's datasheet figures.

Under `AMOS_JAX_CPU_PROCESSES=N` (as amos-train, amos_jax/hostcpu.py) the step runs
as N data-parallel processes, each on its own block of cores, each with its
share of the batch, process 0 compiling for all; the matmul peak is then the sum
of the processes' peaks, measured at once. Process 0 prints the table and writes
the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time

import numpy as np

from amos_jax.errors import ConfigError

# Datasheet figures by `device_kind`: dense bf16 matmul FLOP/s, HBM bytes/s.
DATASHEET = {
    "TPU v4": (275e12, 1228e9),
    "TPU v5 lite": (197e12, 819e9),     # v5e
    "TPU v5": (459e12, 2765e9),         # v5p
    "TPU v6 lite": (918e12, 1640e9),    # v6e
    "NVIDIA H100 80GB HBM3": (989e12, 3350e9),
    "NVIDIA H200": (989e12, 4800e9),
    "NVIDIA A100-SXM4-80GB": (312e12, 2039e9),
    "NVIDIA A100-SXM4-40GB": (312e12, 1555e9),
}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="amos-bench", description="Compile time, step time, tokens/s, FLOPs and MFU "
      "of the train step.", epilog="Any config key can be set with --config.KEY=VALUE.")
  p.add_argument("--config", help="configs/NAME.py[:ARG]")
  p.add_argument("--json", default="", help="also write the results to this JSON file")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--windows", type=int, default=5, help="timed windows")
  p.add_argument("--window_steps", type=int, default=2,
                 help="steps per window (one host sync at the end of each)")
  p.add_argument("--matmul_size", type=int, default=2048,
                 help="side of the square matmul timed for the measured peak")
  return p


def parse_args(argv):
  from amos_jax import config as config_lib
  from amos_jax.cli import split_config_overrides
  rest, overrides = split_config_overrides(argv)
  args, unknown = _parser().parse_known_args(rest)
  if unknown:
    raise ConfigError(f"unknown argument {unknown[0]!r}; see amos-bench --help")
  if not args.config:
    raise ConfigError("amos-bench needs --config configs/X.py[:ARG]")
  if min(args.windows, args.window_steps) < 1 or args.warmup < 0:
    raise ConfigError("--windows and --window_steps must be >= 1, --warmup >= 0")
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  return args, config_lib.freeze(config)


# ------------------------------------------------------------------ measuring
def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Random non-special tokens, one document per row: the step's own cost, no data."""
  from amos_jax.objectives.base import BATCH_KEYS
  b, t = config.train.batch_size, config.train.seq_len
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.model.vocab_size, (b, t), dtype=np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  batch = {"input_ids": ids, "segment_ids": np.ones_like(ids),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "token_type_ids": np.zeros_like(ids), "word_starts": np.ones_like(ids)}
  return {k: batch[k] for k in BATCH_KEYS}


def process_random_batch(config, sharding) -> dict:
  """`random_batch` as global arrays placed by `sharding`, each process giving its
  own block of rows (a multi-process run); one process gives the whole batch."""
  import jax
  rows = config.train.batch_size // jax.process_count()
  lo = jax.process_index() * rows
  return {k: jax.make_array_from_process_local_data(sharding, v[lo:lo + rows])
          for k, v in random_batch(config).items()}


def run_peak(dtype: str, size: int) -> tuple[float, list[float]]:
  """(FLOP/s of all the run's devices, each process's share), measured now.

  A CPU process's devices share one thread pool, so one device's matmul is the
  process's peak (amos_jax/hostcpu.py); processes on disjoint cores add up,
  and are measured at the same time, contending for the host as the step does.
  Accelerator chips add up.
  """
  import jax
  from jax.experimental import multihost_utils
  per_device = jax.devices()[0].platform != "cpu"
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("amos-bench matmul peak")
  peak = matmul_peak(dtype, size) * (jax.local_device_count() if per_device else 1)
  if jax.process_count() == 1:
    return peak, [peak]
  shares = [float(x) for x in multihost_utils.process_allgather(np.float64(peak))]
  return sum(shares), shares


def matmul_peak(dtype: str, size: int, repeats: int = 5) -> float:
  """FLOP/s of a size x size x size matmul on the default backend (best window)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((size, size), dtype) * 0.5
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = f(a, a)
    out.block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


# The table's rows saying which custom calls of our own the step runs (report key,
# label); "XLA" where none.
_NATIVE_ROWS = (("attention_products", "attention products"),
                ("dropout_masks", "dropout masks"), ("layer_norm", "layer norm"),
                ("gelu_backward", "GELU backward"))

_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_HLO_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]\S* (\w[\w-]*)\(([^)]*)\)(.*)$")
_HLO_TUPLE_OP = re.compile(r"^ (\w[\w-]*)\(([^)]*)\)(.*)$")
_HLO_CALLEE = re.compile(r"\b(calls|body|to_apply)=%([\w.\-]+)")
_HLO_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64",
               "s32": "int32", "s8": "int8", "u8": "uint8"}


def _hlo_instruction(line: str):
  """(name, dtype, dims, op, operands, rest) of one HLO instruction line, or None;
  a tuple-shaped instruction (a while loop) has dtype and dims None."""
  m = _HLO_INSTRUCTION.match(line)
  if not m:
    return None
  name, text = m.groups()
  a = _HLO_ARRAY.match(text)
  if a:
    dtype, dims, op, operands, rest = a.groups()
    return name, dtype, tuple(int(d) for d in dims.split(",") if d), op, operands, rest
  if text.startswith("("):  # a tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(text):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        t = _HLO_TUPLE_OP.match(text[i + 1:])
        return (name, None, None) + t.groups() if t else None
  return None


@dataclasses.dataclass(frozen=True)
class Dot:
  """One matrix product of a compiled program and how often a step runs it.

  Shapes, dtypes (NumPy names) and dimension numbers as `lax.dot_general` takes
  them; `count` multiplies through the loops (known trip counts) and fusions that
  contain it.
  """
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  dtype: str
  out_dtype: str
  contracting: tuple[tuple[int, ...], tuple[int, ...]]
  batch: tuple[tuple[int, ...], tuple[int, ...]]
  count: int

  @property
  def flops(self) -> int:
    """2 * output size * contracted size, once."""
    k = math.prod(self.lhs[i] for i in self.contracting[0])
    lhs_free = math.prod(d for i, d in enumerate(self.lhs)
                         if i not in self.contracting[0] + self.batch[0])
    rhs_free = math.prod(d for i, d in enumerate(self.rhs)
                         if i not in self.contracting[1] + self.batch[1])
    return 2 * math.prod(self.lhs[i] for i in self.batch[0]) * lhs_free * rhs_free * k


def hlo_dots(hlo_text: str) -> list[Dot]:
  """Every `dot` of an optimized HLO module (`compiled.as_text()`), merged by shape
  and dimension numbers, with its executions per run of the module.

  A computation's multiplicity is the sum over its call sites (fusion `calls=`,
  `to_apply=`, while `body=` times the loop's known trip count) of the caller's.
  Raises ValueError for a while loop without a known trip count and for a
  conditional (which branch runs is not in the program text).
  """
  shapes, calls, dots, entry = {}, {}, {}, None
  comp = None
  for line in hlo_text.splitlines():
    m = _HLO_COMPUTATION.match(line)
    if m:
      comp = m.group(1)
      shapes[comp], calls[comp], dots[comp] = {}, [], []
      if line.startswith("ENTRY"):
        entry = comp
      continue
    parsed = _hlo_instruction(line) if comp else None
    if not parsed:
      continue
    name, dtype, dims, op, operands, rest = parsed
    shapes[comp][name] = (dtype, dims)
    trip = 1
    if op == "conditional":
      raise ValueError(f"%{name} is a conditional: its products cannot be counted")
    if op == "while":
      t = _HLO_TRIP_COUNT.search(rest)
      if t is None:
        raise ValueError(f"while loop %{name} has no known trip count")
      trip = int(t.group(1))
    for kind, callee in _HLO_CALLEE.findall(rest):
      calls[comp].append((callee, trip if kind == "body" else 1))
    if op == "dot":
      def dims_of(key):
        d = re.search(key + r"=\{([\d,]*)\}", rest)
        return tuple(int(x) for x in d.group(1).split(",") if x) if d else ()
      lhs_name, rhs_name = (o.strip().lstrip("%") for o in operands.split(","))
      dots[comp].append((lhs_name, rhs_name, dtype,
                         (dims_of("lhs_contracting_dims"), dims_of("rhs_contracting_dims")),
                         (dims_of("lhs_batch_dims"), dims_of("rhs_batch_dims"))))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  multiplicity: dict[str, int] = {}

  def visit(c, times):
    multiplicity[c] = multiplicity.get(c, 0) + times
    for callee, trip in calls.get(c, ()):
      visit(callee, times * trip)

  visit(entry, 1)
  merged: dict[tuple, int] = {}
  for c, times in multiplicity.items():
    for lhs_name, rhs_name, out_dtype, contracting, batch in dots[c]:
      lhs_dtype, lhs = shapes[c][lhs_name]
      _, rhs = shapes[c][rhs_name]
      key = (lhs, rhs, _HLO_DTYPES.get(lhs_dtype, lhs_dtype),
             _HLO_DTYPES.get(out_dtype, out_dtype), contracting, batch)
      merged[key] = merged.get(key, 0) + times
  return [Dot(*key, count=n) for key, n in merged.items()]


def time_steps(compiled, state, batch, warmup: int, windows: int, window_steps: int):
  """Per-step seconds of each window ((time of window_steps steps) / window_steps);
  one sync per window; returns (times, final state, last metrics or None)."""
  import jax
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(window_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state.step)
    times.append((time.perf_counter() - start) / window_steps)
  return times, state, metrics


def xla_step_flops(config) -> dict[str, float]:
  """XLA's HLO cost analysis of the whole step (all devices), lowered with the layers
  unrolled: analysed compiled, a scanned step counts its layer loop body once."""
  from amos_jax import config as config_lib
  from amos_jax.train.loop import compile_train_step
  unrolled = config.as_configdict()
  unrolled.model.scan_layers = False
  # The whole step's FLOPs: a one-all-reduce step is lowered per device (shard_map).
  unrolled.sharding.grad_allreduce = "per_layer"
  # A custom call (gemm or cuDNN attention, native dropout masks, LayerNorm, GELU)
  # has no cost analysis: XLA's attention is the same products, XLA's masks the
  # same hash, XLA's LayerNorm and GELU the same formulas.
  unrolled.model.attention_impl = "xla"
  unrolled.model.dropout_impl = "xla"
  unrolled.model.layer_norm_impl = "xla"
  unrolled.model.gelu_impl = "xla"
  cost = compile_train_step(config_lib.freeze(unrolled), lower_only=True)
  # None where the backend's lowering has no cost analysis (libtpu compile-only).
  return {"xla_flops_per_step": cost["xla_flops"] or None,
          "xla_bytes_accessed_per_step_unfused": cost["xla_bytes_accessed"] or None}


def timed_build(objective, mesh):
  """(trainer, seconds): `build_trainer` timed to its state's arrival. Building the
  sharded model and optimizer state (trace, compile and run the initializer) is
  part of the wait before the first step, beside the step's own compile."""
  import jax
  from amos_jax.train.step import build_trainer
  start = time.perf_counter()
  trainer = build_trainer(objective, mesh)
  jax.block_until_ready(trainer.state)
  return trainer, time.perf_counter() - start


def run(config, args) -> dict:
  """Compiles and times the step on this host's devices."""
  import jax
  from amos_jax import config as config_lib
  from amos_jax import hostcpu
  from amos_jax.model import cpu_attention, cpu_gelu, cpu_layer_norm, cpu_matmul, native_lib
  from amos_jax.model import rng as rng_lib
  from amos_jax.model.partitioning import axis_rules
  from amos_jax.objectives import get_objective
  from amos_jax.train import aot
  from amos_jax.train import sharding as shd

  config_lib.validate(config, jax.device_count())
  mesh = shd.build_mesh(config.mesh)
  objective = get_objective(config)
  trainer, init_seconds = timed_build(objective, mesh)
  batch = process_random_batch(config, trainer.batch_sharding)
  with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
    compiled, timings = aot.lower_and_compile(trainer.train_step, (trainer.state, batch))
    hostcpu.settle_on_cores()   # process 0 of a multi-process run, as amos-train
    _, state, metrics = time_steps(compiled, trainer.state, batch, args.warmup, 0,
                                   args.window_steps)
    # The peak is measured after every window, not once: a shared host's speed moves
    # by tens of percent within a minute, and one measurement taken in a slow moment
    # made the MFU of a 2.1 s step 70% (BENCHMARKS.md). The best of them is the
    # denominator: a dip in one slot cannot inflate the MFU.
    times, peaks = [], []
    for _ in range(args.windows):
      window, state, metrics = time_steps(compiled, state, batch, 0, 1, args.window_steps)
      times += window
      peaks.append(run_peak(config.model.dtype, args.matmul_size))
  report = aot.analyze(compiled)
  report.update(timings)
  text = compiled.as_text()
  gemm = cpu_matmul.TARGET in text
  fused = cpu_attention.FORWARD in text

  def native(target, kernel):
    return f"native ({native_lib.isa(kernel)})" if target in text else "XLA"
  t = config.train
  med = float(np.median(times))
  device = jax.local_devices()[0]  # memory stats exist for addressable devices only
  n = jax.device_count()
  analytic = objective.model_flops(t.batch_size, t.seq_len)
  peak, peak_shares = max(peaks, key=lambda p: p[0])
  out = _common(config, objective, state.params, report, analytic)
  if jax.process_index() == 0:  # the one that reports: the others skip this lowering
    out.update(xla_step_flops(config))
  out.update(
      mode="measured", backend=device.platform, device_kind=device.device_kind, devices=n,
      processes=jax.process_count(),
      attention_products=(f"fused ({cpu_attention.isa()})" if fused else
                          f"gemm ({cpu_matmul.isa()})" if gemm else "XLA"),
      dropout_masks=native(rng_lib.NATIVE_KEEP, rng_lib.NATIVE_KEEP),
      layer_norm=native(cpu_layer_norm.FORWARD, cpu_layer_norm.KERNEL),
      gelu_backward=native(cpu_gelu.TARGET, cpu_gelu.KERNEL),
      init_seconds=init_seconds,
      step_seconds_median=med, step_seconds_min=float(min(times)),
      step_seconds_max=float(max(times)),
      step_seconds_spread=float((max(times) - min(times)) / med),
      step_times=[float(x) for x in times], timing=f"{args.windows} windows x "
      f"{args.window_steps} steps after {args.warmup} warm-up step(s)",
      tokens_per_second=t.batch_size * t.seq_len / med,
      loss=float(jax.device_get(metrics["loss"])),
      matmul_peak_flops=peak, matmul_peak_per_process=peak_shares,
      matmul_peak_windows=[p[0] for p in peaks], matmul_peak_dtype=config.model.dtype)
  total = analytic.get("total")
  if total:
    out["model_flops_per_second"] = total / med
    out["mfu_vs_measured_matmul"] = total / med / peak
    sheet = DATASHEET.get(device.device_kind)
    if sheet:
      out["mfu_vs_datasheet"] = total / med / (sheet[0] * n)
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  return out


def aot_estimate(config) -> dict:
  """Compiles for `mesh.topology` ahead of time; a roofline estimate per chip."""
  from amos_jax.objectives import get_objective
  from amos_jax.train.loop import compile_train_step
  report = compile_train_step(config)
  objective = get_objective(config)
  t = config.train
  analytic = objective.model_flops(t.batch_size, t.seq_len)
  out = _common(config, objective, None, report, analytic)
  out.update(xla_step_flops(config))
  out["parameters"] = report["parameters"]
  out.update(mode="ahead-of-time estimate", backend=report["platform"],
             device_kind=report["device_kind"], devices=report["devices"],
             mesh=report["mesh"])
  sheet = DATASHEET.get(report["device_kind"])
  if sheet:
    peak, bandwidth = sheet
    # FLOPs: the unrolled step's, per chip (where the backend's lowering gives no
    # cost analysis, as libtpu's compile-only client, the analytic count). Bytes:
    # the compiled (fused) program's, which counts a scanned layer loop once: with
    # scan_layers, a lower bound.
    flops = out["xla_flops_per_step"] or analytic.get("total") or 0.0
    out["estimate_flops_source"] = ("XLA, unrolled HLO" if out["xla_flops_per_step"]
                                    else "analytic")
    compute_s = flops / report["devices"] / peak
    memory_s = report["xla_bytes_accessed"] / bandwidth
    step = max(compute_s, memory_s)
    out.update(datasheet_peak_flops=peak, datasheet_hbm_bytes_per_second=bandwidth,
               estimate_compute_seconds=compute_s, estimate_memory_seconds=memory_s,
               estimate_step_seconds=step, estimate_bound="compute" if compute_s >= memory_s
               else "memory",
               estimate_tokens_per_second=t.batch_size * t.seq_len / step)
    # With the analytic FLOPs as the compute time, a compute-bound MFU would be 100%
    # by construction: no MFU is claimed then.
    if analytic.get("total") and out["xla_flops_per_step"]:
      out["estimate_mfu"] = analytic["total"] / report["devices"] / step / peak
  return out


def _remat_label(model_config) -> str:
  """The configured remat policy, with what 'auto' resolves to."""
  from amos_jax.model.encoder import EncoderConfig, resolve_remat
  cfg = EncoderConfig.from_config(model_config)
  policy = cfg.remat_policy
  if policy != "auto":
    return policy
  return f"auto ({resolve_remat(policy, cfg.scan_layers and cfg.num_layers > 1)})"


def _common(config, objective, params, report, analytic) -> dict:
  import jax
  t, m = config.train, config.model
  out = {"config": objective.name, "batch_size": t.batch_size, "seq_len": t.seq_len,
         "dtype": m.dtype, "scan_layers": bool(m.get("scan_layers", True)),
         "remat": _remat_label(m), "rng_impl": t.get("rng_impl", "threefry"),
         "attention_dropout": m.attention_dropout,
         **{k: report[k] for k in ("lower_seconds", "compile_seconds",
                                   "lower_cpu_seconds", "compile_cpu_seconds")},
         "memory_per_device_bytes": report["total_bytes"],
         "temp_bytes_per_device": report["temp_bytes"],
         "compiled_xla_flops_per_device": report["xla_flops"],
         "compiled_xla_bytes_accessed_per_device": report["xla_bytes_accessed"],
         "model_flops_per_step": analytic.get("total"),
         "model_flops_by_part": {k: v for k, v in analytic.items() if k != "total"}}
  if params is not None:
    out["parameters"] = int(sum(x.size for x in jax.tree.leaves(params)))
  if report.get("hbm_bytes"):
    out["hbm_bytes"] = report["hbm_bytes"]
  return out


# -------------------------------------------------------------------- output
def _fmt(value, unit="") -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
      if abs(value) >= scale and unit in ("FLOP", "FLOP/s", "B", "B/s"):
        return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.4g} {unit}".rstrip()
  return f"{value} {unit}".rstrip()


def format_table(out: dict) -> str:
  loop_note = " (layer loop once)" if out["scan_layers"] else ""
  rows = [
      ("objective", out["config"]),
      ("mode", out["mode"]),
      ("device", f"{out['devices']} x {out['device_kind']} ({out['backend']})" +
       (f", {out['processes']} processes" if out.get("processes", 1) > 1 else "")),
      ("batch x seq", f"{out['batch_size']} x {out['seq_len']}"),
      ("dtype / scan / remat / rng", f"{out['dtype']} / {out['scan_layers']} / "
       f"{out['remat']} / {out['rng_impl']}"),
      ("parameters", _fmt(float(out.get("parameters", 0)) / 1e6, "M")),
      ("lowering", f"{out['lower_seconds']:.2f} s ({out['lower_cpu_seconds']:.2f} s CPU)"),
      ("compilation", f"{out['compile_seconds']:.2f} s "
       f"({out['compile_cpu_seconds']:.2f} s CPU)"),
      *([("state init (trace, compile, run)", f"{out['init_seconds']:.2f} s")]
        if "init_seconds" in out else []),
      ("model FLOPs / step (analytic)", _fmt(out["model_flops_per_step"], "FLOP")),
      ("XLA FLOPs / step (unrolled HLO)", _fmt(out["xla_flops_per_step"], "FLOP")),
      *[(label, out[key]) for key, label in _NATIVE_ROWS if key in out],
      ("compiled FLOPs / device" + loop_note + (
          " (custom calls uncounted)" if any(out.get(key, "XLA") != "XLA"
                                              for key, _ in _NATIVE_ROWS) else ""),
       _fmt(out["compiled_xla_flops_per_device"], "FLOP")),
      ("compiled bytes accessed / device" + loop_note,
       _fmt(out["compiled_xla_bytes_accessed_per_device"], "B")),
      ("memory / device (XLA)", _fmt(float(out["memory_per_device_bytes"]), "B")),
  ]
  if out["mode"] == "measured":
    rows += [
        ("step time (median)", _fmt(out["step_seconds_median"], "s")),
        ("step time (min .. max)", f"{out['step_seconds_min']:.4g} .. "
         f"{out['step_seconds_max']:.4g} s ({out['timing']})"),
        ("tokens/s", f"{out['tokens_per_second']:,.0f}"),
        ("matmul peak (measured)", _fmt(out["matmul_peak_flops"], "FLOP/s") +
         f" {out['matmul_peak_dtype']}" + (
             " (sum of " + " + ".join(_fmt(x, "FLOP/s") for x in
                                      out["matmul_peak_per_process"]) + ")"
             if len(out.get("matmul_peak_per_process", ())) > 1 else "") +
         _peak_windows(out.get("matmul_peak_windows", ()))),
        ("model FLOP/s", _fmt(out.get("model_flops_per_second"), "FLOP/s")),
        ("MFU vs measured matmul", _pct(out.get("mfu_vs_measured_matmul"))),
        ("MFU vs datasheet", _pct(out.get("mfu_vs_datasheet"))),
    ]
    if "peak_bytes_in_use" in out:
      rows.append(("peak memory in use", _fmt(float(out["peak_bytes_in_use"]), "B")))
  elif "estimate_step_seconds" in out:
    rows += [
        ("ESTIMATE step time (roofline)", _fmt(out["estimate_step_seconds"], "s") +
         f", {out['estimate_bound']}-bound (FLOPs: {out['estimate_flops_source']}; "
         "bytes: compiled" + (", layer loop once: a lower bound" if out["scan_layers"]
                              else "") + ")"),
        ("ESTIMATE tokens/s", f"{out['estimate_tokens_per_second']:,.0f}"),
        ("ESTIMATE MFU", _pct(out.get("estimate_mfu"))),
    ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _peak_windows(peaks) -> str:
  if len(peaks) < 2:
    return ""
  return (f", best of {len(peaks)} beside the windows "
          f"({_fmt(min(peaks), 'FLOP/s')} .. {_fmt(max(peaks), 'FLOP/s')})")


# One process of a multi-process amos-bench (`hostcpu.run_processes`).
_CHILD = "import sys; from amos_jax.cli import bench_main; bench_main(sys.argv[1:])"


def main(argv=None) -> int:
  from amos_jax.cli import _quiet_logging
  from amos_jax.train.distributed import skip_absent_tpu
  argv = sys.argv[1:] if argv is None else argv
  _quiet_logging()
  args, config = parse_args(argv)
  if config.mesh.get("topology"):
    out = aot_estimate(config)
  else:
    from amos_jax import hostcpu
    processes = hostcpu.processes_to_start()
    if processes > 1:  # as amos-train: N data-parallel processes
      return hostcpu.run_config_processes(
          processes, [sys.executable, "-c", _CHILD, *argv], config)
    skip_absent_tpu()
    from amos_jax.train.distributed import maybe_initialize_distributed
    if maybe_initialize_distributed() == 1:
      hostcpu.split_host(1)   # as amos-train: more devices only when asked
    out = run(config, args)
    import jax
    if jax.process_index() != 0:
      return 0
  print(format_table(out))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return 0
