"""The train step: gradient accumulation equals one full step; the non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from amos_jax.errors import TrainingError
from amos_jax.objectives import get_objective
from amos_jax.train import sharding as shd
from amos_jax.train.loop import train_and_evaluate
from amos_jax.train.state import create_train_state, make_optimizer
from amos_jax.train.layer_groups import ungroup
from amos_jax.train.step import make_train_step
from tests.helpers import fast_compile, random_batch, tiny_config


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with fast_compile():
    yield


def _gradient_capture() -> optax.GradientTransformation:
  """An 'optimizer' whose update is zero and whose state is the gradient it was
  given: after one train step, `opt_state` holds exactly that step's gradient."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.mark.parametrize("name", ["electra", "amos"])
def test_four_micro_batches_equal_one_full_step(name):
  """Four micro-batches give the loss, every metric and every gradient of one step
  on the whole batch, with dropout on in both encoders and padded rows: per-row
  keys make each micro-batch draw the full batch's masks, Gumbel samples and
  dropout for its rows, and every mean divides by whole-batch counts. AMOS's
  generator is tapped at 1, 2 and 3 (segment stop-gradients between taps)."""
  batch = random_batch(jax.random.key(5), 16, 32, 64, pad_tail=7)
  runs = []
  for accum in (1, 4):
    c = tiny_config(name, num_layers=1, hidden_dropout=0.1, attention_dropout=0.1)
    if name == "amos":
      c.objective.generator.update(tap_layers=(1, 2, 3), dropout=True)
    c.train.update(batch_size=16, grad_accum_steps=accum)
    objective = get_objective(c)
    tx = _gradient_capture()
    graphdef, state, _ = create_train_state(objective, shd.build_mesh(c.mesh), tx)
    state, m = jax.jit(make_train_step(graphdef, objective, tx))(state, batch)
    runs.append((jax.device_get(m), nnx.to_flat_state(ungroup(state.opt_state))))
  (m1, g1), (m4, g4) = runs
  assert set(m1) == set(m4)
  for k in m1:
    np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert [k for k, _ in g1] == [k for k, _ in g4]
  for (path, a), (_, b) in zip(g1, g4):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-7, err_msg=str(path))
  grads = {"/".join(map(str, k)): v[...] for k, v in g1}
  nonzero = ["discriminator/embeddings/word_embeddings/embedding",
             "generator/encoder/layer/0/output/dense/kernel"]
  if name == "amos":
    nonzero += ["mixture/kernel", "generator/encoder/layer/2/output/dense/kernel"]
  for path in nonzero:
    assert float(jnp.abs(grads[path]).max()) > 0, path


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
