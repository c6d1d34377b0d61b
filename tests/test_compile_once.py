"""The trainer compiles its step once: eval and checkpoint steps, the first step
and the log steps reuse the one program (a recompile would be a silent minute per
occurrence at scale)."""
import logging
import re

from amos_jax.cli import parse_train_args
from amos_jax.train.loop import train_and_evaluate
from tests.train_helpers import TINY_FLAGS, corpus_and_tokenizer  # noqa: F401


def _config(tmp_path, corpus_and_tokenizer, steps, log_every, eval_every, eval_batches,
            checkpoint_every):
  """A tiny ELECTRA run with held-out eval and synchronous checkpoints."""
  corpus, tok = corpus_and_tokenizer
  _, config = parse_train_args([
      *TINY_FLAGS, "--workdir", str(tmp_path), f"--config.data.corpus={corpus}",
      f"--config.data.tokenizer={tok}", f"--config.train.steps={steps}",
      f"--config.train.log_every={log_every}", f"--config.train.eval_every={eval_every}",
      f"--config.train.eval_batches={eval_batches}", "--config.data.eval_fraction=0.1",
      f"--config.checkpoint.every={checkpoint_every}", "--config.checkpoint.async_save=False"])
  return config


def test_train_step_compiles_once_over_eval_and_checkpoint_steps(tmp_path, caplog,
                                                                 corpus_and_tokenizer):
  config = _config(tmp_path, corpus_and_tokenizer, steps=6, log_every=2, eval_every=3,
                   eval_batches=2, checkpoint_every=2)
  # JAX logs every backend compilation at DEBUG (at WARNING under jax_log_compiles).
  caplog.set_level(logging.DEBUG, logger="jax._src.dispatch")
  last = train_and_evaluate(config, str(tmp_path))
  assert "eval_loss" in last
  compiled = [m for m in (r.getMessage() for r in caplog.records)
              if m.startswith("Finished XLA compilation")]
  names = [re.search(r"compilation of (\S+)", m).group(1) for m in compiled]
  assert names.count("jit(train_step)") == 1, names
  assert names.count("jit(eval_step)") == 1, names


def test_no_host_sync_between_log_steps(tmp_path, monkeypatch, corpus_and_tokenizer):
  """Steps are dispatched back to back: between log and eval steps the loop reads
  nothing from the device. Every read of an array's value on the host (float(x),
  np.asarray(x), jax.device_get: all go through `ArrayImpl._value`) is recorded with
  the step the loop is on; only log steps (and the first), eval steps and
  checkpoint saves may read."""
  import jax
  from jax._src import array as array_lib
  from amos_jax.data import sources
  config = _config(tmp_path, corpus_and_tokenizer, steps=12, log_every=4, eval_every=6,
                   eval_batches=1, checkpoint_every=9)
  current, fetched = {"step": None}, []
  batch = sources.InMemorySource.batch

  def spy_batch(self, step):
    current["step"] = step + 1   # the step this batch trains (1-based, as logged)
    return batch(self, step)

  value = array_lib.ArrayImpl._value

  def spy_value(self):
    fetched.append(current["step"])
    return value.fget(self)

  monkeypatch.setattr(sources.InMemorySource, "batch", spy_batch)
  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(spy_value))
  last = train_and_evaluate(config, str(tmp_path))
  assert "eval_loss" in last and current["step"] == 12
  # Log steps 1, 4, 8, 12 read their metrics (and the non-finite counter), eval
  # steps 6 and 12 theirs, the checkpoint at step 9 the state. None: before the
  # first step (restore and set-up).
  assert set(fetched) - {None} <= {1, 4, 6, 8, 9, 12}, fetched
  assert {1, 4, 6, 8, 12} <= set(fetched), fetched
