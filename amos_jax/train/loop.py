"""The trainer: one function that reads top to bottom.

setup -> data -> model and optimizer -> restore -> compile -> loop (log, eval,
checkpoint) -> final save. Single-process runs take the same path as multi-host
ones; only process 0 writes metrics and logs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amos_jax import config as config_lib
from amos_jax.data import sequences
from amos_jax.model.partitioning import axis_rules
from amos_jax.objectives import get_objective
from amos_jax.train import checkpoint as ckpt
from amos_jax.train import sharding as shd
from amos_jax.train.metrics import MetricsWriter
from amos_jax.train.state import create_train_state, make_optimizer
from amos_jax.train.step import make_eval_step, make_train_step

log = logging.getLogger("amos_jax")


class _Preemption:
  """SIGTERM (and SIGINT) set a flag; the loop saves and exits at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. under a test runner thread)
        pass

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _to_global(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the last logged metrics (plain floats).
  """
  # ------------------------------------------------------------------ setup
  primary = jax.process_index() == 0
  config_lib.validate(config, jax.device_count())
  objective = get_objective(config.objective.name)
  mesh = shd.build_mesh(config.mesh)
  rules = config.sharding.rules
  os.makedirs(workdir, exist_ok=True)
  t = config.train

  # ------------------------------------------------------------------- data
  docs = sequences.load_documents(config.data.corpus)
  train_docs, eval_docs = sequences.split_documents(docs, config.data.eval_fraction)
  tokenizer = sequences.get_tokenizer(config, workdir, train_docs)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={config.model.vocab_size} but the tokenizer has "
        f"{tokenizer.vocab_size} ids; set --config.model.vocab_size="
        f"{tokenizer.vocab_size}")
  with config.unlocked():
    config.data.mask_id = tokenizer.mask_id
    config.data.special_ids = tuple(sorted({tokenizer.pad_id, tokenizer.unk_id,
                                            tokenizer.cls_id, tokenizer.sep_id,
                                            tokenizer.mask_id}))
  rows, starts = sequences.make_rows(tokenizer, train_docs, t.seq_len)
  train_data = sequences.SequenceBatches(rows, starts, t.batch_size, t.seed,
                                         jax.process_index(), jax.process_count())
  eval_data = None
  if eval_docs:
    rows, starts = sequences.make_rows(tokenizer, eval_docs, t.seq_len)
    eval_data = sequences.SequenceBatches(rows, starts, t.batch_size, t.seed,
                                          jax.process_index(), jax.process_count())
  if primary:
    log.info("data: %d train rows (%d tokens), %d eval rows; vocab %d",
             len(train_data.rows), train_data.rows.size,
             0 if eval_data is None else len(eval_data.rows), tokenizer.vocab_size)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ------------------------------------------------- model and optimizer
  tx = make_optimizer(t)
  graphdef, state, state_sh = create_train_state(objective, config, mesh, tx)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  if primary:
    log.info("model: %s, %.2fM parameters, mesh %s", config.objective.name,
             n_params / 1e6, dict(mesh.shape))

  # ---------------------------------------------------------------- restore
  manager = ckpt.make_manager(workdir, config)
  if manager.latest_step() is not None:
    step, state = ckpt.restore(manager, ckpt_abstract(state, state_sh))
    if primary:
      log.info("resumed from checkpoint at step %d", step)
  start_step = int(jax.device_get(state.step))

  # ---------------------------------------------------------------- compile
  batch_sh = shd.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(graphdef, objective, config, tx),
                       in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, objective, config),
                      in_shardings=(state_sh.params, batch_sh, None),
                      out_shardings=shd.replicated(mesh))
  eval_batches = ([_to_global(b, batch_sh) for b in eval_data.eval_batches(t.eval_batches)]
                  if eval_data is not None else [])

  def evaluate(params, step):
    if not eval_batches:
      return {}
    with jax.set_mesh(mesh), axis_rules(rules):
      ms = [eval_step(params, b, i) for i, b in enumerate(eval_batches)]
    mean = {k: np.mean([float(m[k]) for m in ms]) for k in ms[0]}
    return writer.write(step, mean, prefix="eval_")

  # ------------------------------------------------------------------- loop
  writer = MetricsWriter(workdir, enabled=primary)
  preemption = _Preemption()
  last = {}
  bar = tqdm(total=t.steps, initial=start_step, disable=not primary, unit="step",
             dynamic_ncols=True)
  window_start, window_steps = time.perf_counter(), 0
  tokens_per_step = t.batch_size * t.seq_len
  step = start_step
  try:
    with jax.set_mesh(mesh), axis_rules(rules):
      while step < t.steps:
        batch = _to_global(train_data.batch(step), batch_sh)
        state, metrics = train_step(state, batch)
        step += 1
        window_steps += 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps or step == start_step + 1:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - window_start
          metrics["step_time"] = elapsed / window_steps
          metrics["tokens_per_sec"] = tokens_per_step * window_steps / elapsed
          last = writer.write(step, metrics)
          bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
          window_start, window_steps = time.perf_counter(), 0
          streak = int(jax.device_get(state.nonfinite_streak))
          if t.max_nonfinite_steps and streak >= t.max_nonfinite_steps:
            ckpt.save(manager, step, state, force=True)
            raise SystemExit(
                f"error: {streak} consecutive steps had non-finite gradients (last at "
                f"step {step}); saved the last good state. Lower train.learning_rate "
                "or check the data")
        if t.eval_every and step % t.eval_every == 0:
          last.update(evaluate(state.params, step))
        ckpt.save(manager, step, state)
        if preemption.requested:
          if primary:
            log.warning("termination requested: saving step %d and exiting", step)
          ckpt.save(manager, step, state, force=True)
          break
    if step == t.steps and not (t.eval_every and step % t.eval_every == 0):
      last.update(evaluate(state.params, step))
    if step == t.steps and manager.latest_step() != step:
      ckpt.save(manager, step, state, force=True)
  finally:
    manager.wait_until_finished()
    manager.close()
    bar.close()
    writer.close()
    preemption.restore()
  return last


def ckpt_abstract(state, state_sh):
  from amos_jax.train.state import abstract_state
  return abstract_state(state_sh, state)
