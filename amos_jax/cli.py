"""Command-line entry points.

amos-train --config configs/X.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")


def _train(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise SystemExit("error: amos-train needs --config configs/X.py[:ARG] and --workdir DIR")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  from amos_jax.config import ConfigError
  from amos_jax.train.loop import train_and_evaluate
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None


def train_main():
  app.run(_train)


if __name__ == "__main__":
  sys.exit(train_main())
