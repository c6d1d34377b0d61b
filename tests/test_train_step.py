"""The train step: gradient accumulation equals one full step; the non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amos_jax.errors import TrainingError
from amos_jax.objectives import get_objective
from amos_jax.train import sharding as shd
from amos_jax.train.loop import train_and_evaluate
from amos_jax.train.state import create_train_state, make_optimizer
from amos_jax.train.step import make_train_step
from tests.helpers import random_batch, tiny_config


def _run(config, batches):
  objective = get_objective(config)
  tx = make_optimizer(config.train)
  mesh = shd.build_mesh(config.mesh)
  graphdef, state, _ = create_train_state(objective, mesh, tx)
  step = jax.jit(make_train_step(graphdef, objective, tx))
  metrics = []
  for b in batches:
    state, m = step(state, b)
    metrics.append(jax.device_get(m))
  return state, metrics


def test_four_micro_batches_equal_one_full_step():
  # Dropout on: per-row keys make each micro-batch draw the full batch's masks,
  # Gumbel samples and dropout for its rows.
  batches = [random_batch(jax.random.key(i), 16, 32, 64, pad_tail=7) for i in range(2)]
  runs = []
  for accum in (1, 4):
    c = tiny_config("electra", num_layers=1, hidden_dropout=0.1, attention_dropout=0.1)
    c.train.update(batch_size=16, grad_accum_steps=accum, warmup_steps=0,
                   learning_rate=1e-2)
    runs.append(_run(c, batches))
  (s1, m1), (s4, m4) = runs
  for a, b in zip(m1, m4):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert m1[1]["loss"] != m1[0]["loss"]
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped():
  c = tiny_config("mlm", num_layers=1)
  batch = random_batch(jax.random.key(0), 8, 32, 64)
  objective = get_objective(c)
  tx = make_optimizer(c.train)
  graphdef, state, _ = create_train_state(objective, shd.build_mesh(c.mesh), tx)
  step = jax.jit(make_train_step(graphdef, objective, tx))
  good, m = step(state, batch)
  assert float(m["skipped"]) == 0 and int(good.nonfinite_streak) == 0
  # A NaN in one parameter makes every gradient NaN.
  bad_params = jax.tree.map(lambda x: x, good.params)
  leaf = jax.tree.leaves(bad_params)[0]
  poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x is leaf else x,
                          bad_params)
  bad = good.replace(params=poisoned)
  after, m = step(bad, batch)
  after, m2 = step(after, batch)
  assert float(m["skipped"]) == 1 and float(m2["skipped"]) == 1
  assert int(after.nonfinite_streak) == 2 and int(after.step) == int(good.step) + 2
  for x, y in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(good.opt_state)):
    np.testing.assert_array_equal(x, y)


def test_run_stops_after_k_skipped_steps_with_a_checkpoint(tmp_path, corpus_and_tokenizer):
  corpus, tok = corpus_and_tokenizer
  c = tiny_config("mlm", num_layers=1, vocab_size=128)
  c.data.update(corpus=corpus, tokenizer=tok, eval_fraction=0.0)
  # An overflowing learning rate: every update is infinite, so every step is skipped.
  c.train.update(steps=20, learning_rate=1e39, warmup_steps=0, max_nonfinite_steps=3,
                 log_every=1)
  c.checkpoint.update(every=100)
  with pytest.raises(TrainingError, match="3 consecutive steps had non-finite"):
    train_and_evaluate(c, str(tmp_path))
  saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert "3" in saved, saved


from tests.train_helpers import corpus_and_tokenizer  # noqa: E402,F401  (fixture)
