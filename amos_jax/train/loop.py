"""The trainer: one function that reads top to bottom.

setup -> data -> model and optimizer -> restore -> compile -> loop (log, eval,
checkpoint) -> final save. Single-process runs take the same path as multi-host
ones; only process 0 writes metrics and logs.
"""
from __future__ import annotations

import logging
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amos_jax import config as config_lib
from amos_jax import hostcpu
from amos_jax.data.pipeline import to_global_arrays
from amos_jax.data.sources import make_source
from amos_jax.errors import ConfigError, TrainingError
from amos_jax.model.partitioning import axis_rules
from amos_jax.objectives import get_objective
from amos_jax.objectives.base import BATCH_KEYS
from amos_jax.train import checkpoint as ckpt
from amos_jax.train import sharding as shd
from amos_jax.train import workdir as workdir_lib
from amos_jax.train.metrics import MetricsWriter
from amos_jax.train.layer_groups import group, ungroup
from amos_jax.train.state import abstract_train_state, make_optimizer
from amos_jax.train.step import build_trainer, jit_train_step, make_eval_step

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


def init_from(objective, state, params_shardings):
  """Replaces the fresh parameters with those of `config.init_from` (hf:PATH).

  Parameters the checkpoint lacks (e.g. heads) keep their initialization and are
  listed in the log. The optimizer state needs no change: fresh Adam moments are
  zeros whatever the parameters are.
  """
  from amos_jax.hf.load import format_report, init_params_from_hf
  config = objective.config
  if not config.init_from.startswith("hf:"):
    raise ConfigError(
        f"init_from={config.init_from!r}: use hf:PATH (a Hugging Face model folder)")
  params, report = init_params_from_hf(config.init_from, ungroup(state.params), objective)
  if jax.process_index() == 0:
    log.info(format_report(report))
  return state.replace(params=jax.jit(group, out_shardings=params_shardings)(params))


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the last logged metrics (plain floats). Everything that can be checked
  without data or compiling (config, devices, workdir, the saved run's config) is
  checked before the workdir changes.
  """
  # ------------------------------------------------------------------ setup
  config = config_lib.freeze(config)
  primary = jax.process_index() == 0
  config_lib.validate(config, jax.device_count())
  t = config.train
  workdir_lib.check_writable(workdir)
  changes = workdir_lib.check_config(workdir, config, allow_config_change)
  _warn_about_schedule(t, primary)
  mesh = shd.build_mesh(config.mesh)
  rules = config.sharding.rules

  # ------------------------------------------------------------------- data
  data = make_source(config, workdir)
  objective = get_objective(config, data.tokens)
  if primary:
    log.info("data: %s", data.summary)
    if changes:
      log.warning("config changed since the saved run: %s", ", ".join(
          f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    workdir_lib.write_config(workdir, config)

  # ------------------------------------------------- model and optimizer
  trainer = build_trainer(objective, mesh)
  graphdef, state, state_sh = trainer.graphdef, trainer.state, trainer.state_shardings
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  if primary:
    log.info("model: %s, %.2fM parameters, mesh %s", config.objective.name,
             n_params / 1e6, dict(mesh.shape))

  # ---------------------------------------------------------------- restore
  # Checkpoints hold the per-layer form (names as in the model). The abstract
  # target carries this run's shardings: a checkpoint written on another mesh is
  # resharded as it is read, then stacked into the trainer's form.
  manager = ckpt.make_manager(workdir, config)
  form = trainer.checkpoint_form
  step, restored = ckpt.restore(manager, form.abstract, data.iterator)
  if restored is not None:
    state = form.from_checkpoint(restored)
    del restored
    if primary:
      log.info("resumed from checkpoint at step %d", step)
  elif config.get("init_from"):
    # ------------------------------------------------------------ init_from
    state = init_from(objective, state, state_sh.params)
  start_step = int(jax.device_get(state.step))
  if start_step >= t.steps and primary:
    log.info("%s already holds step %d of train.steps=%d: nothing to train (to go on, "
             "raise --config.train.steps and pass --allow_config_change, or use a new "
             "--workdir)", workdir, start_step, t.steps)
  if primary:
    # Rows logged after the restored step are recomputed now: the file reads as one run.
    dropped = workdir_lib.truncate_metrics(workdir, start_step)
    if dropped:
      log.info("metrics.jsonl: dropped %d rows after step %d (recomputed on resume)",
               dropped, start_step)

  # ---------------------------------------------------------------- compile
  batch_sh, train_step = trainer.batch_sharding, trainer.train_step
  eval_step = jax.jit(make_eval_step(graphdef, objective),
                      in_shardings=(state_sh.params, batch_sh, None),
                      out_shardings=shd.replicated(mesh),
                      compiler_options=shd.compiler_options(mesh))
  eval_batches = [to_global_arrays(b, mesh, batch_sh) for b in data.eval_batches(t.eval_batches)]

  def evaluate(params, step):
    if not eval_batches:
      return {}
    with jax.set_mesh(mesh), axis_rules(rules):
      ms = [eval_step(params, b, i) for i, b in enumerate(eval_batches)]
    ms = jax.device_get(ms)  # one explicit transfer for all eval batches
    mean = {k: np.mean([float(m[k]) for m in ms]) for k in ms[0]}
    return writer.write(step, mean, prefix="eval_")

  def save(step, state, force=False):
    return ckpt.save(manager, step, state, force=force, data_iterator=data.iterator,
                     convert=form.to_checkpoint)

  # ------------------------------------------------------------------- loop
  # TensorBoard drops events at or after purge_step: a resumed run replaces them.
  writer = MetricsWriter(workdir, enabled=primary, purge_step=start_step + 1)
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
        if step == start_step:  # compiled: process 0 of a CPU run settles on its cores
          hostcpu.settle_on_cores()
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
            raise TrainingError(
                f"{streak} consecutive steps had non-finite gradients (last at step "
                f"{step}); saved the last good state. Lower train.learning_rate or "
                "check the data")
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


def _warn_about_schedule(t, primary: bool) -> None:
  warmup = config_lib.warmup_steps(t)
  if primary and warmup > t.steps:
    log.warning("train.warmup_steps=%d is more than train.steps=%d: the learning rate "
                "never reaches train.learning_rate (peak %.3g of %.3g); lower it, or set "
                "--config.train.warmup_fraction=0.1 to warm up over 10%% of the steps",
                warmup, t.steps, t.learning_rate * t.steps / max(1, warmup),
                t.learning_rate)


def compile_train_step(config, lower_only: bool = False) -> dict:
  """Lowers and compiles the train step for the configured mesh; nothing runs.

  Devices: the TPU pod `mesh.topology` names (e.g. "v5p:4x4x4", via libtpu's
  compile-only client), else `mesh.fake_devices` CPU devices, else this host's.
  Batches are abstract (B, T) int32 arrays, so no data is read. Returns the
  per-device memory report of `aot.compile_and_report`; with lower_only, only the
  lowered program's HLO cost analysis (FLOPs and bytes before XLA's optimizations,
  no compile).
  """
  from amos_jax.train import aot
  if config.mesh.get("topology"):
    devices = aot.topology_devices(config.mesh.topology)
  elif config.mesh.get("fake_devices"):
    devices = aot.fake_cpu_devices(int(config.mesh.fake_devices))
  else:
    devices = jax.devices()
  config = config_lib.freeze(config)
  config_lib.validate(config, len(devices))
  objective = get_objective(config)
  mesh = shd.build_mesh(config.mesh, devices)
  tx = make_optimizer(config.train)
  graphdef, abstract, state_sh = abstract_train_state(objective, mesh, tx)
  t = config.train
  batch_sh = shd.batch_sharding(mesh, config.sharding.rules)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sh)
           for k in BATCH_KEYS}
  step = jit_train_step(graphdef, objective, tx, state_sh, batch_sh, mesh)
  with jax.set_mesh(mesh), axis_rules(config.sharding.rules):
    if lower_only:
      return aot.lowered_cost(step.lower(abstract, batch))
    report = aot.compile_and_report(step, (abstract, batch))
  report["mesh"] = dict(mesh.shape)
  report["parameters"] = int(sum(x.size for x in jax.tree.leaves(abstract.params)))
  return report
