"""The run directory's contract, checked before anything in it changes.

A workdir holds what amos-train wrote: `config.json`, `metrics.jsonl`,
`tensorboard/`, `tokenizer/`, `checkpoints/`. Rerunning resumes it, so the rerun's
config must be the saved one: a model of another size must not pick up (or push
aside) the saved checkpoints, nor mix its metrics into the file. Keys are sorted
into three kinds:

  neutral  never change what is computed (mesh, sharding rules, checkpoint and
           logging cadence, eval settings): allowed, and recorded
  safe     change the optimization but not the model or data (steps, learning-rate
           schedule, clipping, accumulation): allowed with --allow_config_change
  the rest model, objective, data, seed: a mismatch stops the run
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

from amos_jax import config as config_lib
from amos_jax import paths
from amos_jax.errors import CheckpointError

log = logging.getLogger("amos_jax")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# What amos-train writes; a folder holding any of these without a config.json was
# not written by a run we can resume.
RUN_ENTRIES = ("checkpoints", METRICS_FILE, "tensorboard")

NEUTRAL_PREFIXES = ("mesh.", "sharding.", "checkpoint.")
# How the same computation runs (layer scan, rematerialization, attention kernel,
# where dropout's masks are drawn, which kernels run LayerNorm and GELU's backward pass)
# changes no parameter and no loss beyond rounding.
NEUTRAL_KEYS = {"train.log_every", "train.eval_every", "train.eval_batches", "init_from",
                "init_from_allow_pickle", "model.scan_layers", "model.remat",
                "model.attention_impl", "model.dropout_impl", "model.layer_norm_impl",
                "model.gelu_impl", "train.compilation_cache_dir"}
SAFE_KEYS = {"train.steps", "train.learning_rate", "train.warmup_steps",
             "train.warmup_fraction", "train.schedule", "train.end_learning_rate_fraction",
             "train.clip_norm", "train.weight_decay", "train.max_nonfinite_steps",
             "train.grad_accum_steps"}


def check_writable(workdir: str) -> None:
  """The workdir exists (or can be made) as a folder we can write in.

  On an object store (`gs://`) there are no folders to make: the first write
  (config.json, a checkpoint) shows whether the bucket takes writes.
  """
  if not paths.is_local(workdir):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} is a file; give a folder (new or an "
                          "earlier run's)")
  parent = workdir
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent.rstrip(os.sep)) or "."
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise CheckpointError(f"--workdir {workdir} sits under the file {parent}; give a "
                          "folder path")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise CheckpointError(f"--workdir {workdir} cannot be written ({e.strerror}); give "
                          "a folder you can write to") from None


def saved_config(workdir: str) -> dict | None:
  """The config.json of an earlier run, or None for a new workdir."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    present = [e for e in RUN_ENTRIES if paths.exists(paths.join(workdir, e))]
    if present:
      raise CheckpointError(
          f"--workdir {workdir} holds {', '.join(present)} but no {CONFIG_FILE}, so it "
          "is not an amos-train run this can resume; give a new --workdir")
    return None
  try:
    return paths.read_json(path)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} cannot be read ({e}); restore it from the run's "
                          "records or use a new --workdir") from None


def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def config_changes(saved: dict, config) -> dict[str, tuple]:
  """{key: (saved value, new value)} for every key that differs."""
  old, new = config_lib.flat_keys(saved), config_lib.flat_keys(_as_json(config))
  return {k: (old.get(k, "<absent>"), new.get(k, "<absent>"))
          for k in sorted(set(old) | set(new)) if old.get(k, None) != new.get(k, None)
          or (k in old) != (k in new)}


def _neutral(key: str) -> bool:
  return key.startswith(NEUTRAL_PREFIXES) or key in NEUTRAL_KEYS


def check_config(workdir: str, config, allow_change: bool = False) -> dict[str, tuple]:
  """Stops (one line naming the keys) when `config` does not match the saved one.

  Returns the allowed changes (neutral, and safe ones under `allow_change`).
  """
  saved = saved_config(workdir)
  if saved is None:
    return {}
  changes = config_changes(saved, config)
  unsafe = [k for k in changes if not _neutral(k) and k not in SAFE_KEYS]
  safe = [k for k in changes if k in SAFE_KEYS]

  def show(keys):
    return ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in keys[:6]) + (
        f" and {len(keys) - 6} more" if len(keys) > 6 else "")

  if unsafe:
    raise CheckpointError(
        f"--workdir {workdir} holds a run with another config: {show(unsafe)}; use a new "
        "--workdir, or rerun with the saved values (see its config.json)")
  if safe and not allow_change:
    raise CheckpointError(
        f"--workdir {workdir} holds a run with {show(safe)}; pass --allow_config_change "
        "to continue it with the new values, or rerun with the saved ones")
  return changes


def write_config(workdir: str, config) -> None:
  """config.json, written whole or not at all."""
  write_atomic(paths.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


write_atomic = paths.write_atomic


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops metrics.jsonl rows logged after `step` (the restored checkpoint): they
  are recomputed by the resumed run, and the file must read as one run. Returns the
  number of rows dropped."""
  path = paths.join(workdir, METRICS_FILE)
  if not paths.exists(path):
    return 0
  lines = [line for line in paths.read_text(path).splitlines(keepends=True) if line.strip()]
  kept = []
  for line in lines:
    try:
      row_step = int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
      continue  # a torn last line from a killed run
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  dropped = len(lines) - len(kept)
  if dropped:
    write_atomic(path, "".join(kept))
  return dropped
