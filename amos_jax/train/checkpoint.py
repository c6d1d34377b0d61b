"""Orbax checkpoints of the train state (and, where the input pipeline has one, its
iterator state) in `workdir/checkpoints/<step>`."""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=c.every, max_to_keep=c.keep,
      keep_period=c.keep_period or None,
      enable_async_checkpointing=bool(c.async_save), create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=force)


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores into `abstract_state`'s shapes and shardings (this reshards)."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return step, restored.state
