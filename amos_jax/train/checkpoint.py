"""Orbax checkpoints of the train state (and, where the input pipeline has one, its
iterator state) in `workdir/checkpoints/<step>`.

Saves are async: the step's arrays are copied off the devices (the blocking part)
and written in the background. A save that did not finish leaves only a temporary
directory, which Orbax never lists as a step. A listed step that fails to restore
(corrupt or truncated files) is moved aside to `<step>.corrupt` with a warning and
the previous step is used; nothing is ever written over a finished step. A step
that reads fine but holds another model (other shapes or parameters) is a mismatch,
not corruption: it stops the run with a CheckpointError and is left untouched.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import orbax.checkpoint as ocp

from amos_jax import paths
from amos_jax.errors import CheckpointError, one_line

log = logging.getLogger("amos_jax")


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Keeps the latest `checkpoint.keep` steps plus every `keep_period`-th step."""
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=c.every, max_to_keep=c.keep,
      keep_period=c.keep_period or None,
      enable_async_checkpointing=bool(c.async_save), create=True)
  directory = paths.as_path(workdir) / "checkpoints"
  if paths.is_local(directory):
    directory = os.path.abspath(os.fspath(directory))  # Orbax wants absolute local paths
  return ocp.CheckpointManager(directory, options=options)


def _data_save(data_iterator):
  import grain
  return grain.checkpoint.CheckpointSave(data_iterator)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False,
         data_iterator=None, convert=None) -> bool:
  """Saves `state` (and the iterator's position) at `step`; False if not due.

  A step already on disk is left as it is. convert: applied to `state` only when
  the step is saved (the trainer's per-layer copy, `CheckpointForm.to_checkpoint`).
  """
  if step in manager.all_steps() or not (force or manager.should_save(step)):
    return False
  if convert is not None:
    state = convert(state)
  items = dict(state=ocp.args.StandardSave(state))
  if data_iterator is not None:
    items["data"] = _data_save(data_iterator)
  start = time.perf_counter()
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  if saved:
    log.debug("checkpoint %d: %.3f s blocking", step, time.perf_counter() - start)
  return saved


def restore_step(manager: ocp.CheckpointManager, abstract_state, step: int,
                 data_iterator=None):
  """Restores `step` into `abstract_state`'s shapes and shardings (this reshards).

  The iterator, if given, continues in place from the saved position.
  """
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    import grain
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored.state


def _shapes(tree) -> dict[str, tuple]:
  """{'params/a/b': shape} of a state or metadata tree (nnx's 'value' level dropped)."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  out = {}
  for path, leaf in flat:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    out["/".join(n for n in names if n != "value")] = tuple(getattr(leaf, "shape", ()))
  return out


def check_matches(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """Raises CheckpointError when `step` holds a state of other parameters or shapes.

  Reads only the checkpoint's metadata; a step whose metadata cannot be read is
  left to `restore`, which treats it as corrupt.
  """
  metadata = ocp.StandardCheckpointer().metadata(
      paths.as_path(manager.directory) / str(step) / "state")
  saved = getattr(metadata, "item_metadata", metadata)
  saved = _shapes(getattr(saved, "tree", saved))
  wanted = _shapes(abstract_state)
  if not saved or saved == wanted:
    return
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  shapes = [f"{k} {saved[k]} vs {wanted[k]}" for k in sorted(set(saved) & set(wanted))
            if saved[k] != wanted[k]]
  what = "; ".join(part for part in (
      f"shapes differ: {', '.join(shapes[:2])}" if shapes else "",
      f"not in the checkpoint: {', '.join(missing[:2])}" if missing else "",
      f"only in the checkpoint: {', '.join(extra[:2])}" if extra else "") if part)
  raise CheckpointError(
      f"checkpoint {step} in {manager.directory} holds another model ({what}); use the "
      "config it was trained with or a new --workdir")


def restore(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
  """The newest step that restores: (step, state), or (None, None) if none does.

  A step that holds another model stops the run (CheckpointError). A step that
  fails to read is moved aside and reported, and the one before it is tried.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      check_matches(manager, step, abstract_state)
    except CheckpointError:
      raise
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore below decides
      pass
    try:
      return step, restore_step(manager, abstract_state, step, data_iterator)
    except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
      reason = one_line(e)[:200] or type(e).__name__
      aside = _move_aside(manager, step)
      log.warning("checkpoint at step %d is incomplete or corrupt (%s: %s); moved to "
                  "%s, trying the previous one", step, type(e).__name__, reason, aside)
  return None, None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  src = paths.join(manager.directory, str(step))
  dst = f"{src}.corrupt"
  if jax.process_index() == 0 and paths.exists(src):
    n = 0
    while paths.exists(dst):
      n += 1
      dst = f"{src}.corrupt{n}"
    paths.rename(src, dst)
  _sync(f"amos_jax_ckpt_aside_{step}")
  manager.reload()
  return dst


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
