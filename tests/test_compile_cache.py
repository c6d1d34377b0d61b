"""`train.compilation_cache_dir`: amos-train keeps XLA's executables on disk and a
second run of the same program loads them, to the same losses."""
import os

import jax
import pytest

from amos_jax.errors import ConfigError
from amos_jax.train import compile_cache
from amos_jax.train.metrics import read_metrics
from tests.train_helpers import corpus_and_tokenizer, run_train  # noqa: F401


@pytest.fixture
def jax_cache_dir():
  """Restores JAX's cache directory (a process-wide setting) after the test."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_enable_creates_the_directory_or_says_what_to_do(tmp_path, jax_cache_dir):
  assert compile_cache.enable("") is None
  assert jax.config.jax_compilation_cache_dir is None
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError, match=r"train.compilation_cache_dir=.*a_file/x.*''"):
    compile_cache.enable(str(blocker / "x"))
  assert blocker.read_text() == "not a directory"
  path = compile_cache.enable(str(tmp_path / "cache" / "xla"))
  assert path == str(tmp_path / "cache" / "xla") and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  # A directory the user gave JAX itself is kept.
  assert compile_cache.enable(str(tmp_path / "other")) == path
  assert not (tmp_path / "other").exists()


def _train_step_entries(cache):
  return sorted(p.name for p in cache.iterdir() if "train_step" in p.name)


def test_a_second_run_loads_the_step_from_the_cache_and_trains_the_same(
    tmp_path, corpus_and_tokenizer, monkeypatch):
  cache = tmp_path / "xla"
  # Cache the tiny programs too (JAX skips those that compile in under a second).
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  flags = ("--config.train.steps=3", f"--config.train.compilation_cache_dir={cache}")
  first = run_train(tmp_path / "a", corpus_and_tokenizer, *flags)
  assert first.returncode == 0, first.stderr[-2000:]
  entries = _train_step_entries(cache)
  assert entries, sorted(os.listdir(cache))
  second = run_train(tmp_path / "b", corpus_and_tokenizer, *flags)
  assert second.returncode == 0, second.stderr[-2000:]
  # The same programs: no new entries.
  assert _train_step_entries(cache) == entries
  losses = [[r["loss"] for r in read_metrics(str(tmp_path / w)) if "loss" in r]
            for w in ("a", "b")]
  assert losses[0] and losses[0] == losses[1]
