"""Nothing in a workdir is lost to a rerun with another config: a mismatch stops
before anything changes, checkpoints of another model are never called corrupt, and
metrics.jsonl reads as one run after a resume."""
import json
import os
import shutil

import pytest

from amos_jax.errors import CheckpointError
from amos_jax.train.loop import train_and_evaluate
from amos_jax.train.metrics import read_metrics
from amos_jax.train.workdir import check_config
from tests.helpers import tiny_config
from tests.train_helpers import corpus_and_tokenizer  # noqa: F401  (fixture)


def _config(corpus_and_tok, **train):
  corpus, tok = corpus_and_tok
  c = tiny_config("electra", num_layers=1, vocab_size=128)
  c.data.update(corpus=corpus, tokenizer=tok, eval_fraction=0.0)
  c.train.update(steps=2, log_every=1, warmup_steps=1)
  c.train.update(train)
  c.checkpoint.update(every=2, async_save=False)
  return c


def _snapshot(workdir):
  """Every file under the workdir with its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, workdir)] = fh.read()
  return out


def test_another_model_stops_before_anything_changes(tmp_path, corpus_and_tokenizer):
  work = str(tmp_path / "run")
  train_and_evaluate(_config(corpus_and_tokenizer), work)
  before = _snapshot(work)
  other = _config(corpus_and_tokenizer)
  other.model.update(hidden_size=64, intermediate_size=128)
  with pytest.raises(CheckpointError) as e:
    train_and_evaluate(other, work)
  msg = str(e.value)
  assert "model.hidden_size (32 -> 64)" in msg and "model.intermediate_size" in msg
  assert "\n" not in msg
  assert _snapshot(work) == before  # no .corrupt, config.json and metrics untouched
  # Back to the original model (and more steps, allowed): it resumes the checkpoint.
  last = train_and_evaluate(_config(corpus_and_tokenizer, steps=3), work,
                            allow_config_change=True)
  assert last and int(json.load(open(os.path.join(work, "config.json")))["train"]["steps"]) == 3
  assert [r["step"] for r in read_metrics(work)] == [1, 2, 3]


def test_safe_changes_need_the_flag(tmp_path, corpus_and_tokenizer):
  work = str(tmp_path / "run")
  train_and_evaluate(_config(corpus_and_tokenizer), work)
  changed = _config(corpus_and_tokenizer, steps=4, learning_rate=1e-4)
  with pytest.raises(CheckpointError, match="pass --allow_config_change"):
    check_config(work, changed)
  assert set(check_config(work, changed, allow_change=True)) == {
      "train.steps", "train.learning_rate"}
  # Neutral keys (logging, checkpoint cadence, mesh) never need it.
  neutral = _config(corpus_and_tokenizer, log_every=5)
  neutral.checkpoint.keep = 7
  assert set(check_config(work, neutral)) == {"train.log_every", "checkpoint.keep"}


def test_checkpoint_of_another_model_is_a_mismatch_not_corruption(tmp_path,
                                                                 corpus_and_tokenizer):
  small, wide = str(tmp_path / "small"), str(tmp_path / "wide")
  train_and_evaluate(_config(corpus_and_tokenizer), small)
  c = _config(corpus_and_tokenizer)
  c.model.update(hidden_size=64, intermediate_size=128)
  train_and_evaluate(c, wide)
  # The wide run's checkpoint replaced by the small one's (a copy gone wrong).
  shutil.rmtree(os.path.join(wide, "checkpoints"))
  shutil.copytree(os.path.join(small, "checkpoints"), os.path.join(wide, "checkpoints"))
  with pytest.raises(CheckpointError, match="holds another model"):
    train_and_evaluate(c, wide)
  # Left as they were: nothing renamed *.corrupt.
  assert (sorted(os.listdir(os.path.join(wide, "checkpoints")))
          == sorted(os.listdir(os.path.join(small, "checkpoints"))))


def test_resume_drops_metrics_past_the_checkpoint(tmp_path, corpus_and_tokenizer):
  """A run killed after logging step 4 but before checkpointing it: the rerun resumes
  at 2 and recomputes 3 and 4, which must appear once, equal to the first time."""
  work = str(tmp_path / "run")
  cfg = _config(corpus_and_tokenizer, steps=4)
  train_and_evaluate(cfg, work)
  first = {r["step"]: r["loss"] for r in read_metrics(work)}
  shutil.rmtree(os.path.join(work, "checkpoints", "4"))
  train_and_evaluate(cfg, work)
  rows = read_metrics(work)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert {r["step"]: r["loss"] for r in rows} == first


def test_foreign_folder_is_refused(tmp_path, corpus_and_tokenizer):
  work = tmp_path / "notes"
  work.mkdir()
  (work / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
  with pytest.raises(CheckpointError, match="no config.json"):
    train_and_evaluate(_config(corpus_and_tokenizer), str(work))
  assert (work / "metrics.jsonl").read_text() == '{"step": 1, "mine": true}\n'
  assert sorted(os.listdir(work)) == ["metrics.jsonl"]
