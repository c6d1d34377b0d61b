"""The trainer compiles its step once: eval and checkpoint steps, the first step
and the log steps reuse the one program (a recompile would be a silent minute per
occurrence at scale)."""
import logging
import re

from amos_jax.cli import parse_train_args
from amos_jax.train.loop import train_and_evaluate
from tests.train_helpers import TINY_FLAGS, corpus_and_tokenizer  # noqa: F401


def test_train_step_compiles_once_over_eval_and_checkpoint_steps(tmp_path, caplog,
                                                                 corpus_and_tokenizer):
  corpus, tok = corpus_and_tokenizer
  _, config = parse_train_args([
      *TINY_FLAGS, "--workdir", str(tmp_path), f"--config.data.corpus={corpus}",
      f"--config.data.tokenizer={tok}", "--config.train.steps=6",
      "--config.train.log_every=2", "--config.train.eval_every=3",
      "--config.train.eval_batches=2", "--config.data.eval_fraction=0.1",
      "--config.checkpoint.every=2", "--config.checkpoint.async_save=False"])
  # JAX logs every backend compilation at DEBUG (at WARNING under jax_log_compiles).
  caplog.set_level(logging.DEBUG, logger="jax._src.dispatch")
  last = train_and_evaluate(config, str(tmp_path))
  assert "eval_loss" in last
  compiled = [m for m in (r.getMessage() for r in caplog.records)
              if m.startswith("Finished XLA compilation")]
  names = [re.search(r"compilation of (\S+)", m).group(1) for m in compiled]
  assert names.count("jit(train_step)") == 1, names
  assert names.count("jit(eval_step)") == 1, names
