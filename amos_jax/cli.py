"""Command-line entry points.

amos-train --config configs/X.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]
amos-train --config configs/X.py[:ARG] --compile_only [--config.mesh.topology=v5p:4x4x4]
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False,
    "Lower and compile the train step for the configured mesh (mesh.topology for a "
    "TPU pod, mesh.fake_devices for fake CPU devices), print the memory per device "
    "and exit; reads no data.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (default: "
    "detected from the launcher: Cloud TPU, SLURM, Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _quiet_logging() -> None:
  """Our `amos_jax` logger at INFO; absl's and Orbax's INFO chatter off the console."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  logging.getLogger("amos_jax").setLevel(logging.INFO)


def _train(argv):
  del argv
  _quiet_logging()
  # Before anything touches a JAX backend: a multi-process run joins here.
  from amos_jax.train.distributed import maybe_initialize_distributed
  try:
    maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
  except ValueError as e:
    raise SystemExit(str(e) if str(e).startswith("error:") else f"error: {e}") from None
  if _CONFIG.value is None or (not _WORKDIR.value and not _COMPILE_ONLY.value):
    raise SystemExit("error: amos-train needs --config configs/X.py[:ARG] and --workdir DIR "
                     "(or --compile_only)")
  from amos_jax.config import ConfigError
  from amos_jax.train import loop
  try:
    if _COMPILE_ONLY.value:
      _compile_only(loop, _CONFIG.value)
    else:
      loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None


def _compile_only(loop, config) -> None:
  from amos_jax.train import aot
  try:
    report = loop.compile_train_step(config)
  except RuntimeError as e:  # libtpu missing, unknown topology, too few CPU devices
    if str(e).startswith("error:"):
      raise SystemExit(str(e)) from None
    raise
  mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
  print(f"{config.objective.name}: {report['parameters'] / 1e6:.1f}M parameters, "
        f"global batch {config.train.batch_size} x {config.train.seq_len}, "
        f"grad_accum_steps {config.train.grad_accum_steps}, mesh {mesh}")
  print(aot.format_memory_report(report))


def _check_config_path(argv: list[str]) -> None:
  """A missing --config file is one error line, not the flag parser's traceback."""
  import os
  for i, arg in enumerate(argv):
    value = (arg.split("=", 1)[1] if arg.startswith("--config=") else
             argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None and not os.path.isfile(value.split(":", 1)[0]):
      raise SystemExit(f"error: --config: no such file {value.split(':', 1)[0]!r}; give "
                       "configs/NAME.py[:ARG]")


def train_main():
  _check_config_path(sys.argv[1:])
  app.run(_train)


if __name__ == "__main__":
  sys.exit(train_main())
