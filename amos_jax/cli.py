"""Command-line entry points; the only place an `AmosError` becomes `error: ...`.

amos-train --config configs/X.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]
amos-train --config configs/X.py[:ARG] --compile_only [--config.mesh.topology=v5p:4x4x4]
amos-bench --config configs/X.py[:ARG] [--json PATH]   (amos_jax/train/bench.py)
amos-prepare ...   (amos_jax/data/prepare.py)
amos-export ...    (amos_jax/hf/export.py)

Every entry point runs through `run_command`: an expected failure (any `AmosError`)
prints one `error:` line on stderr and exits with status 2; nothing else is caught.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from amos_jax import hostcpu, hostmem
from amos_jax.errors import AmosError, ConfigError, one_line


def run_command(main: Callable[[], int | None]) -> int:
  """Runs `main()`; an AmosError becomes one `error:` line and status 2."""
  try:
    return int(main() or 0)
  except AmosError as e:
    sys.stdout.flush()
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2


def _quiet_logging() -> None:
  """Our `amos_jax` logger at INFO; absl's and Orbax's INFO chatter off the console."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  logging.getLogger("amos_jax").setLevel(logging.INFO)


# --------------------------------------------------------------------- amos-train
def _train_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="amos-train", description="Pre-train (or fine-tune) an encoder.",
      epilog="Any config key can be set with --config.KEY=VALUE, e.g. "
             "--config.train.steps=1000 --config.model.dtype=bfloat16.")
  p.add_argument("--config", help="configs/NAME.py[:ARG]")
  p.add_argument("--workdir", help="run directory (checkpoints, metrics, config.json)")
  p.add_argument("--compile_only", action="store_true",
                 help="lower and compile the train step for the configured mesh "
                 "(mesh.topology for a TPU pod, mesh.fake_devices for fake CPU devices), "
                 "print the memory per device and exit; reads no data")
  p.add_argument("--allow_config_change", action="store_true",
                 help="resume a workdir whose saved config differs only in keys that "
                 "are safe to change (train.steps, learning-rate schedule, eval, "
                 "logging, checkpoint cadence)")
  p.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 for jax.distributed (default: detected "
                 "from the launcher: Cloud TPU, SLURM, Open MPI)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  return p


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.KEY=VALUE` (or `--config.KEY VALUE`) from the other flags."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
        i += 1
        value = argv[i]
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def parse_train_args(argv: list[str]):
  """(args, frozen config) from amos-train's command line; all errors are AmosError."""
  from amos_jax import config as config_lib
  rest, overrides = split_config_overrides(argv)
  parser = _train_parser()
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    raise ConfigError(f"unknown argument {unknown[0]!r}; see amos-train --help")
  if not args.config:
    raise ConfigError("amos-train needs --config configs/X.py[:ARG] and --workdir DIR "
                      "(or --compile_only)")
  if not args.workdir and not args.compile_only:
    raise ConfigError("amos-train needs --workdir DIR (or --compile_only)")
  config = config_lib.load_config_file(args.config)
  config_lib.apply_overrides(config, overrides)
  return args, config_lib.freeze(config)


def _train(argv: list[str]) -> int:
  _quiet_logging()
  args, config = parse_train_args(argv)
  processes = hostcpu.processes_to_start()
  if processes > 1 and not args.compile_only and args.num_processes is None:
    # One process per block of cores, data-parallel (amos_jax/hostcpu.py).
    return hostcpu.run_config_processes(
        processes, [sys.executable, "-m", "amos_jax.cli", *argv], config)
  if not args.compile_only:  # before the first compilation, which fixes JAX's choice
    from amos_jax.train import compile_cache
    compile_cache.enable(config.train.compilation_cache_dir)
  # Before anything touches a JAX backend: a multi-process run joins here.
  from amos_jax.train.distributed import maybe_initialize_distributed, skip_absent_tpu
  if not config.mesh.get("topology"):
    skip_absent_tpu()
  processes = maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                           args.process_id)
  if processes == 1 and not config.mesh.get("topology") and not config.mesh.get("fake_devices"):
    hostcpu.split_host(1)   # more devices only when asked (amos_jax/hostcpu.py)
  from amos_jax.train import loop
  if args.compile_only:
    _compile_only(loop, config)
  else:
    loop.train_and_evaluate(config, args.workdir,
                            allow_config_change=args.allow_config_change)
  return 0


def _compile_only(loop, config) -> None:
  from amos_jax.train import aot
  report = loop.compile_train_step(config)
  mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
  print(f"{config.objective.name}: {report['parameters'] / 1e6:.1f}M parameters, "
        f"global batch {config.train.batch_size} x {config.train.seq_len}, "
        f"grad_accum_steps {config.train.grad_accum_steps}, mesh {mesh}")
  print(aot.format_memory_report(report))


def from_command_line(argv: list[str] | None) -> list[str]:
  """argv, or the command line's arguments after re-executing it with huge pages."""
  if argv is None:
    hostmem.use_huge_pages()
    return sys.argv[1:]
  return argv


def train_main(argv: list[str] | None = None) -> None:
  argv = from_command_line(argv)
  sys.exit(run_command(lambda: _train(argv)))


def prepare_main(argv: list[str] | None = None) -> None:
  from amos_jax.data import prepare
  sys.exit(run_command(lambda: prepare.main(argv)))


def bench_main(argv: list[str] | None = None) -> None:
  argv = from_command_line(argv)
  from amos_jax.train import bench
  sys.exit(run_command(lambda: bench.main(argv)))


def export_main(argv: list[str] | None = None) -> None:
  from amos_jax.hf import export
  sys.exit(run_command(lambda: export.main(argv)))


if __name__ == "__main__":
  train_main()
