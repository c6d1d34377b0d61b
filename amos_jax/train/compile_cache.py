"""JAX's persistent compilation cache for `amos-train` (`train.compilation_cache_dir`).

A run compiles its model initializer and its train step before the first step:
about 28 s of the 47 s an ELECTRA-small run on a 2-core CPU waits. XLA's
executables are kept on disk, keyed by the program, the compile options and the
backend's version, so a second run of the same program (a resume after
preemption, the same config again) loads them instead (BENCHMARKS.md, "Time to the
first step"). A changed program is a different key: the cache can be stale only
in disk space. `amos-bench` does not use it: it measures compilation.
"""
from __future__ import annotations

import os

import jax

from amos_jax.errors import ConfigError


def enable(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` ('' = off).

  Returns the directory in use, or None when off. A cache directory the user already
  gave JAX (JAX_COMPILATION_CACHE_DIR) is kept. Local directories are created;
  gs:// and other remote paths are left to JAX.
  """
  given = jax.config.jax_compilation_cache_dir
  if given:
    return given
  if not directory:
    return None
  path = os.path.expanduser(directory)
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise ConfigError(
          f"train.compilation_cache_dir={directory!r}: cannot create it "
          f"({e.strerror}); give a writable directory, or '' to compile every run "
          "afresh") from None
    if not os.access(path, os.W_OK):
      raise ConfigError(
          f"train.compilation_cache_dir={directory!r} is not writable; give a writable "
          "directory, or '' to compile every run afresh")
  jax.config.update("jax_compilation_cache_dir", path)
  return path
