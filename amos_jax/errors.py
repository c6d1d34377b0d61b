"""The one exception hierarchy of amos_jax.

Library code raises these, never `SystemExit`, so a notebook or another program can
catch every expected failure with `except AmosError`. The message is one line that
names the problem and the fix, without an "error:" prefix; only the command-line
entry points (`amos_jax.cli.run_command`) print it as `error: <message>` and exit
with status 2.
"""
from __future__ import annotations


class AmosError(Exception):
  """A failure with a one-line message naming the problem and the fix."""


class ConfigError(AmosError, ValueError):
  """A config value (or a flag) that cannot work."""


class DataError(AmosError):
  """Input data that cannot be read or used: corpus, shards, manifest, tokenizer."""


class CheckpointError(AmosError):
  """A workdir or checkpoint that cannot be used as asked (mismatch, unreadable)."""


class HFImportError(AmosError):
  """A Hugging Face checkpoint that cannot be imported (`init_from=hf:PATH`)."""


class ExportError(AmosError):
  """An export that cannot be written as asked (`amos-export`)."""


class TrainingError(AmosError):
  """Training cannot go on (e.g. a run of non-finite steps); the last good state is saved."""


def one_line(message: str) -> str:
  """Collapses a message to its first non-empty line (tool output can be long)."""
  for line in str(message).splitlines():
    if line.strip():
      return line.strip()
  return ""
