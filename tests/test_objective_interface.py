"""A new objective is one module and a config: the trainer, validator and checkpoints
take it through the Objective interface without a line changed."""
import math

import pytest

from amos_jax.errors import ConfigError
from amos_jax.objectives import available, get_objective, get_objective_class
from amos_jax.objectives.base import Objective, SpecialTokens
from amos_jax.train.loop import train_and_evaluate
from amos_jax.train.metrics import read_metrics
from tests.helpers import tiny_config
from tests.objective_example import RandomReplacementDetection
from tests.train_helpers import corpus_and_tokenizer  # noqa: F401  (fixture)


def test_objectives_in_the_package_are_discovered():
  assert {"mlm", "electra", "amos"} <= set(available())
  for name in available():
    assert issubclass(get_objective_class(name), Objective)


def test_an_objective_outside_the_package_trains(tmp_path, corpus_and_tokenizer):
  corpus, tok = corpus_and_tokenizer
  c = tiny_config("tests.objective_example", num_layers=1, vocab_size=128)
  c.data.update(corpus=corpus, tokenizer=tok, eval_fraction=0.1)
  c.train.update(steps=6, log_every=1, warmup_steps=1, learning_rate=3e-3, eval_every=6,
                 eval_batches=1)
  c.checkpoint.update(every=3, async_save=False)
  assert isinstance(get_objective(c), RandomReplacementDetection)
  train_and_evaluate(c, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all(math.isfinite(v) for r in rows for v in r.values())
  assert train[-1]["loss"] < train[0]["loss"]
  assert any("eval_detection_accuracy" in r for r in rows)
  assert (tmp_path / "checkpoints" / "6").is_dir()


def test_objective_validates_its_own_section():
  c = tiny_config("tests.objective_example")
  c.objective.mask_rate = 1.5
  with pytest.raises(ConfigError, match="objective.mask_rate=1.5"):
    get_objective_class(c.objective.name).validate_config(c)
  with pytest.raises(ConfigError, match="cannot import"):
    get_objective_class("tests.no_such_objective")


def test_special_ids_come_from_the_tokenizer_not_the_config():
  c = tiny_config("mlm")
  obj = get_objective(c, SpecialTokens(pad_id=0, unk_id=7, cls_id=5, sep_id=6, mask_id=9))
  assert obj.masking.mask_id == 9 and obj.masking.special_ids == (0, 5, 6, 7, 9)
  assert "mask_id" not in c.data
