"""The trainer: one function that reads top to bottom.

setup -> data -> model and optimizer -> restore -> compile -> loop (log, eval,
checkpoint) -> final save. Single-process runs take the same path as multi-host
ones; only process 0 writes metrics and logs.
"""
from __future__ import annotations

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
from amos_jax.data.pipeline import to_global_arrays
from amos_jax.model.partitioning import axis_rules
from amos_jax.objectives import get_objective
from amos_jax.train import checkpoint as ckpt
from amos_jax.train import sharding as shd
from amos_jax.train.metrics import MetricsWriter
from amos_jax.train.state import abstract_state, abstract_train_state, make_optimizer
from amos_jax.train.step import build_trainer, make_eval_step, make_train_step

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


def _any_process(flag: bool) -> bool:
  """True on every process when any process has the flag (a SIGTERM reaches hosts
  at different times; all must stop at the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _set_special_ids(config, ids: dict) -> None:
  with config.unlocked():
    config.data.mask_id = int(ids["mask_id"])
    config.data.special_ids = tuple(sorted({int(ids[k]) for k in (
        "pad_id", "unk_id", "cls_id", "sep_id", "mask_id")}))


def _check_vocab(config, vocab_size: int) -> None:
  if vocab_size != config.model.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={config.model.vocab_size} but the tokenizer has "
        f"{vocab_size} ids; set --config.model.vocab_size={vocab_size}")


class _InMemoryData:
  """The small-corpus path: batches are a function of the step (no iterator state)."""

  iterator = None

  def __init__(self, config, workdir):
    t = config.train
    docs = sequences.load_documents(config.data.corpus)
    train_docs, eval_docs = sequences.split_documents(docs, config.data.eval_fraction)
    tokenizer = sequences.get_tokenizer(config, workdir, train_docs)
    _check_vocab(config, tokenizer.vocab_size)
    _set_special_ids(config, dict(pad_id=tokenizer.pad_id, unk_id=tokenizer.unk_id,
                                  cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                                  mask_id=tokenizer.mask_id))
    rows, starts = sequences.make_rows(tokenizer, train_docs, t.seq_len)
    self.train = sequences.SequenceBatches(rows, starts, t.batch_size, t.seed,
                                           jax.process_index(), jax.process_count())
    self.eval = None
    if eval_docs:
      rows, starts = sequences.make_rows(tokenizer, eval_docs, t.seq_len)
      self.eval = sequences.SequenceBatches(rows, starts, t.batch_size, t.seed,
                                            jax.process_index(), jax.process_count())
    self.summary = (f"{len(self.train.rows)} train rows ({self.train.rows.size} tokens), "
                    f"{0 if self.eval is None else len(self.eval.rows)} eval rows; "
                    f"vocab {tokenizer.vocab_size}")

  def batch(self, step: int) -> dict:
    return self.train.batch(step)

  def eval_batches(self, n: int) -> list[dict]:
    return self.eval.eval_batches(n) if self.eval is not None else []


class _PreparedData:
  """amos-prepare output through the grain pipeline; its iterator state is saved in
  each checkpoint, so a resumed run reads on from where the checkpoint was taken."""

  def __init__(self, config):
    from amos_jax.data import pipeline, prepare
    t = config.train
    manifest = prepare.load_manifest(config.data.prepared)
    tok = manifest["tokenizer"]
    _check_vocab(config, int(tok["vocab_size"]))
    _set_special_ids(config, tok)
    self.iterator = pipeline.make_iterator(pipeline.PipelineConfig(
        data_dir=config.data.prepared, seq_len=t.seq_len, global_batch_size=t.batch_size,
        seed=t.seed, vocab_size=config.model.vocab_size))
    self.summary = (f"prepared data {manifest['dir']} ({len(manifest['shards'])} "
                    f"shards); vocab {tok['vocab_size']}")

  def batch(self, step: int) -> dict:
    del step  # the iterator's position is the step's (both are checkpointed)
    return next(self.iterator)

  def eval_batches(self, n: int) -> list[dict]:
    del n
    return []


def init_from(config, state):
  """Replaces the fresh parameters with those of `config.init_from` (hf:PATH).

  Parameters the checkpoint lacks (e.g. heads) keep their initialization and are
  listed in the log. The optimizer state needs no change: fresh Adam moments are
  zeros whatever the parameters are.
  """
  from amos_jax.hf.load import format_report, init_params_from_hf
  if not config.init_from.startswith("hf:"):
    raise config_lib.ConfigError(
        f"init_from={config.init_from!r}: use hf:PATH (a Hugging Face model folder)")
  params, report = init_params_from_hf(config.init_from, state.params, config)
  if jax.process_index() == 0:
    log.info(format_report(report))
  return state.replace(params=params)


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
  data = (_PreparedData(config) if config.data.get("prepared")
          else _InMemoryData(config, workdir))
  if primary:
    log.info("data: %s", data.summary)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ------------------------------------------------- model and optimizer
  trainer = build_trainer(objective, config, mesh)
  graphdef, state, state_sh = trainer.graphdef, trainer.state, trainer.state_shardings
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  if primary:
    log.info("model: %s, %.2fM parameters, mesh %s", config.objective.name,
             n_params / 1e6, dict(mesh.shape))

  # ---------------------------------------------------------------- restore
  # The abstract target carries this run's shardings: a checkpoint written on
  # another mesh is resharded as it is read.
  manager = ckpt.make_manager(workdir, config)
  step, restored = ckpt.restore(manager, abstract_state(state_sh, state), data.iterator)
  if restored is not None:
    state = restored
    if primary:
      log.info("resumed from checkpoint at step %d", step)
  elif config.get("init_from"):
    # ------------------------------------------------------------ init_from
    state = init_from(config, state)
  start_step = int(jax.device_get(state.step))
  if start_step >= t.steps and primary:
    log.info("%s already holds step %d of train.steps=%d: nothing to train (raise "
             "--config.train.steps to continue, or use a new --workdir)", workdir,
             start_step, t.steps)

  # ---------------------------------------------------------------- compile
  batch_sh, train_step = trainer.batch_sharding, trainer.train_step
  eval_step = jax.jit(make_eval_step(graphdef, objective, config),
                      in_shardings=(state_sh.params, batch_sh, None),
                      out_shardings=shd.replicated(mesh))
  eval_batches = [to_global_arrays(b, mesh, batch_sh) for b in data.eval_batches(t.eval_batches)]

  def evaluate(params, step):
    if not eval_batches:
      return {}
    with jax.set_mesh(mesh), axis_rules(rules):
      ms = [eval_step(params, b, i) for i, b in enumerate(eval_batches)]
    mean = {k: np.mean([float(m[k]) for m in ms]) for k in ms[0]}
    return writer.write(step, mean, prefix="eval_")

  def save(step, state, force=False):
    return ckpt.save(manager, step, state, force=force, data_iterator=data.iterator)

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
        batch = to_global_arrays(data.batch(step), mesh, batch_sh)
        state, metrics = train_step(state, batch)
        step += 1
        window_steps += 1
        if step % t.log_every == 0 or step == t.steps or step == start_step + 1:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - window_start
          metrics["step_time"] = elapsed / window_steps
          metrics["tokens_per_sec"] = tokens_per_step * window_steps / elapsed
          last = writer.write(step, metrics)
          # Steps are dispatched asynchronously; the bar advances only here, where
          # the host has waited for them, so its rate is the real one.
          bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
          bar.update(window_steps)
          window_start, window_steps = time.perf_counter(), 0
          streak = int(jax.device_get(state.nonfinite_streak))
          if t.max_nonfinite_steps and streak >= t.max_nonfinite_steps:
            # Skipped steps left the parameters as they were: this is the last
            # good state.
            save(step, state, force=True)
            raise SystemExit(
                f"error: {streak} consecutive steps had non-finite gradients (last at "
                f"step {step}); saved the last good state. Lower train.learning_rate "
                "or check the data")
        if t.eval_every and step % t.eval_every == 0:
          last.update(evaluate(state.params, step))
        save(step, state)
        if _any_process(preemption.requested) or manager.reached_preemption(step):
          if primary:
            log.warning("termination requested: saving step %d and exiting", step)
          save(step, state, force=True)
          break
    if step == t.steps and not (t.eval_every and step % t.eval_every == 0):
      last.update(evaluate(state.params, step))
    if step == t.steps:
      save(step, state, force=True)
  finally:
    manager.wait_until_finished()
    manager.close()
    bar.close()
    writer.close()
    preemption.restore()
  return last


def compile_train_step(config) -> dict:
  """Lowers and compiles the train step for the configured mesh; nothing runs.

  Devices: the TPU pod `mesh.topology` names (e.g. "v5p:4x4x4", via libtpu's
  compile-only client), else `mesh.fake_devices` CPU devices, else this host's.
  Batches are abstract (B, T) int32 arrays, so no data is read. Returns the
  per-device memory report of `aot.compile_and_report`.
  """
  from amos_jax.train import aot
  if config.mesh.get("topology"):
    devices = aot.topology_devices(config.mesh.topology)
  elif config.mesh.get("fake_devices"):
    devices = aot.fake_cpu_devices(int(config.mesh.fake_devices))
  else:
    devices = jax.devices()
  config_lib.validate(config, len(devices))
  objective = get_objective(config.objective.name)
  mesh = shd.build_mesh(config.mesh, devices)
  tx = make_optimizer(config.train)
  graphdef, abstract, state_sh = abstract_train_state(objective, config, mesh, tx)
  t = config.train
  batch_sh = shd.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sh)
           for k in ("input_ids", "segment_ids", "positions", "token_type_ids",
                     "word_starts")}
  with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
    report = aot.compile_and_report(
        make_train_step(graphdef, objective, config, tx), (abstract, batch),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, shd.replicated(mesh)),
        donate_argnums=0)
  report["mesh"] = dict(mesh.shape)
  report["parameters"] = int(sum(x.size for x in jax.tree.leaves(abstract.params)))
  return report
