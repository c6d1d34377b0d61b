"""The optimizer the train step applies is AdamW with the configured schedule.

Several steps of the real train step (`make_train_step` with `make_optimizer`) are
compared with a NumPy AdamW written from the paper's update rule (Loshchilov &
Hutter: global-norm clipping, Adam with bias correction, decoupled weight decay on
everything but biases and LayerNorm scales, times the learning rate of the
warmup-then-decay schedule). A wrong schedule, a wrong decay mask or an
off-by-one in either makes the parameters differ.

The non-finite rule: `state.step` counts every attempted step; it keys the step's
randomness and sets its learning rate. A skipped step changes neither the
parameters nor Adam's moments and count.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from amos_jax import config as config_lib
from amos_jax.objectives import get_objective
from amos_jax.objectives.base import Objective
from amos_jax.train import sharding as shd
from amos_jax.train.state import create_train_state, learning_rate_schedule, make_optimizer
from amos_jax.train.layer_groups import ungroup
from amos_jax.train.step import make_train_step, step_rng
from tests.helpers import fast_compile, tiny_config

V, E, B, T = 11, 8, 4, 6
PEAK, END_FRACTION, WARMUP, STEPS, WD = 0.05, 0.1, 3, 8, 0.3


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with fast_compile():
    yield


# ----------------------------------------------------------- a tiny objective
class _Toy(nnx.Module):
  """Every kind of parameter the encoder has: embedding, kernel, bias, LayerNorm."""

  def __init__(self, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(V, E, rngs=rngs)
    self.dense = nnx.Linear(E, E, rngs=rngs)
    self.LayerNorm = nnx.LayerNorm(E, rngs=rngs)
    self.out = nnx.Linear(E, 1, rngs=rngs)

  def __call__(self, ids):
    h = self.LayerNorm(jax.nn.gelu(self.dense(self.word_embeddings(ids))))
    return self.out(h)[..., 0]


class _ToyRegression(Objective):
  """A deterministic loss, plus a probe of the step's key (the first row's)."""
  name = "toy"

  def build_model(self, rngs):
    return _Toy(rngs)

  def loss(self, model, batch, counts, rng, train):
    loss = jnp.mean((model(batch["input_ids"]) - batch["target"]) ** 2)
    return loss, {"loss": loss, "key_probe": jax.random.uniform(rng[0])}


def _toy_config(**train):
  c = config_lib.base_config()
  c.train.update(learning_rate=PEAK, end_learning_rate_fraction=END_FRACTION,
                 warmup_steps=WARMUP, steps=STEPS, schedule="linear", weight_decay=WD,
                 b1=0.8, b2=0.95, eps=1e-6, clip_norm=0.05, seed=3, grad_accum_steps=1)
  c.train.update(train)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def _batch(i, nan=False):
  k1, k2 = jax.random.split(jax.random.key(100 + i))
  target = 3.0 * jax.random.normal(k2, (B, T))
  if nan:
    target = target.at[0, 0].set(jnp.nan)
  return {"input_ids": jax.random.randint(k1, (B, T), 0, V), "target": target}


@pytest.fixture(scope="module")
def toy():
  """(objective, graphdef, initial state, jitted train step): compiled once."""
  objective = _ToyRegression(_toy_config())
  tx = make_optimizer(objective.config.train)
  mesh = shd.build_mesh(objective.config.mesh, jax.devices()[:1])
  graphdef, state, _ = create_train_state(objective, mesh, tx)
  return objective, graphdef, state, jax.jit(make_train_step(graphdef, objective, tx))


# -------------------------------------------------------- the NumPy reference
def reference_learning_rate(s, steps=STEPS, warmup=WARMUP, schedule="linear"):
  """Linear warmup from 0 to PEAK over `warmup` steps, then linear (or cosine)
  decay to END_FRACTION * PEAK at `steps`."""
  if s < warmup:
    return PEAK * s / warmup
  progress = min(s - warmup, steps - warmup) / (steps - warmup)
  if schedule == "cosine":
    return PEAK * (END_FRACTION + (1 - END_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))
  return PEAK + (END_FRACTION * PEAK - PEAK) * progress


def _names(params):
  return {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): x
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def decayed(name: str) -> bool:
  """BERT/ELECTRA: no weight decay on biases and LayerNorm scales."""
  leaf = name.split("/")[-1]
  return not (leaf == "bias" or ("LayerNorm" in name and leaf == "scale"))


class NumpyAdamW:
  """clip_by_global_norm -> Adam (bias-corrected) -> + wd * p (masked) -> x (-lr)."""

  def __init__(self, params: dict, t):
    self.t, self.count = t, 0
    self.p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.clipped = 0

  def update(self, grads: dict, lr: float):
    t = self.t
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    if norm > t.clip_norm:
      g = {k: x * t.clip_norm / norm for k, x in g.items()}
      self.clipped += 1
    self.count += 1
    for k in self.p:
      self.m[k] = t.b1 * self.m[k] + (1 - t.b1) * g[k]
      self.v[k] = t.b2 * self.v[k] + (1 - t.b2) * g[k] ** 2
      m_hat = self.m[k] / (1 - t.b1 ** self.count)
      v_hat = self.v[k] / (1 - t.b2 ** self.count)
      direction = m_hat / (np.sqrt(v_hat) + t.eps)
      if decayed(k):
        direction = direction + t.weight_decay * self.p[k]
      self.p[k] = self.p[k] - lr * direction


def _reference_grads(graphdef, params_like, flat, batch):
  """Gradients of the toy loss at the reference's parameters (float32, as trained)."""
  leaves = [jnp.asarray(flat[k], jnp.float32) for k in _names(params_like)]
  params = jax.tree.unflatten(jax.tree.structure(params_like), leaves)
  grad = jax.grad(lambda p: jnp.mean(
      (nnx.merge(graphdef, ungroup(p))(batch["input_ids"]) - batch["target"]) ** 2))(params)
  return _names(grad)


def _run(toy, nan_at=None):
  """Train STEPS steps; returns (final state, metrics per step, NumpyAdamW reference)."""
  objective, graphdef, state, step = toy
  t = objective.config.train
  ref = NumpyAdamW(_names(state.params), t)
  metrics = []
  for s in range(STEPS):
    batch = _batch(s, nan=s == nan_at)
    if s != nan_at:
      ref.update(_reference_grads(graphdef, state.params, ref.p, batch),
                 reference_learning_rate(s))
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return state, metrics, ref


def _assert_params_equal(params, ref):
  for name, x in _names(params).items():
    np.testing.assert_allclose(np.asarray(x), ref.p[name], rtol=2e-4, atol=2e-6,
                               err_msg=name)


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_is_warmup_then_decay(schedule):
  t = _toy_config(schedule=schedule).train
  schedule_fn = learning_rate_schedule(t)
  for s in range(STEPS + 3):
    np.testing.assert_allclose(float(schedule_fn(s)),
                               reference_learning_rate(s, schedule=schedule),
                               rtol=1e-6, atol=1e-9, err_msg=f"step {s}")
  assert float(schedule_fn(0)) == 0.0 and float(schedule_fn(WARMUP)) == pytest.approx(PEAK)


def test_train_steps_equal_a_numpy_adamw(toy):
  state, metrics, ref = _run(toy)
  assert ref.clipped > 0, "the clip never acted: the test would not see it"
  for s, m in enumerate(metrics):
    assert float(m["skipped"]) == 0
    np.testing.assert_allclose(float(m["learning_rate"]), reference_learning_rate(s),
                               rtol=1e-6, atol=1e-9, err_msg=f"step {s}")
  _assert_params_equal(state.params, ref)
  assert int(optax.tree.get(state.opt_state, "count")) == STEPS


def test_skipped_step_moves_the_clock_but_not_the_optimizer(toy):
  """A NaN at step 4: the step is skipped (parameters, moments and Adam's count as
  they were), but step 5 uses step 5's key and learning rate, and the following
  updates equal AdamW that never saw step 4."""
  objective, graphdef, state0, step = toy
  nan_at = 4
  state, metrics, ref = _run(toy, nan_at=nan_at)
  assert [float(m["skipped"]) for m in metrics] == [float(s == nan_at) for s in range(STEPS)]
  seed = objective.config.train.seed
  for s, m in enumerate(metrics):
    np.testing.assert_allclose(float(m["learning_rate"]), reference_learning_rate(s),
                               rtol=1e-6, atol=1e-9, err_msg=f"step {s}")
    # Row 0's key is the step key folded with its row index.
    expected = jax.random.uniform(jax.random.fold_in(step_rng(seed, s), 0))
    assert float(m["key_probe"]) == float(expected), f"step {s} used another key"
  assert int(state.step) == STEPS
  assert int(optax.tree.get(state.opt_state, "count")) == STEPS - 1
  assert int(state.nonfinite_streak) == 0
  _assert_params_equal(state.params, ref)

  # The skipped step itself leaves parameters and optimizer state bit for bit.
  s = state0
  for i in range(nan_at):
    s, _ = step(s, _batch(i))
  after, _ = step(s, _batch(nan_at, nan=True))
  for x, y in zip(jax.tree.leaves((s.params, s.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(x, y)
  assert int(after.step) == nan_at + 1 and int(after.nonfinite_streak) == 1


class _ZeroLoss(Objective):
  """The real model with a zero loss: an AdamW step is then weight decay alone."""

  def __init__(self, inner):
    super().__init__(inner.config, inner.tokens)
    self.inner = inner

  def build_model(self, rngs):
    return self.inner.build_model(rngs)

  def loss(self, model, batch, counts, rng, train):
    zero = jnp.zeros((), jnp.float32)
    return zero, {"loss": zero}


def test_real_model_decays_all_but_biases_and_layernorm_scales():
  """Every parameter of an AMOS model (GDES delta, mixture, both heads, factorized
  embeddings): kernels and embeddings shrink by (1 - lr * wd); biases and
  LayerNorm scales do not."""
  c = tiny_config("amos", num_layers=1)
  c.objective.embedding_sharing = "gdes"
  c.train.update(warmup_steps=0, learning_rate=0.1, weight_decay=0.5)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  objective = _ZeroLoss(get_objective(c))
  tx = make_optimizer(c.train)
  graphdef, state, _ = create_train_state(
      objective, shd.build_mesh(c.mesh, jax.devices()[:1]), tx)
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  state = state.replace(params=jax.tree.unflatten(
      treedef, [1.0 + jax.random.uniform(k, x.shape) for k, x in zip(keys, leaves)]))
  after, m = jax.jit(make_train_step(graphdef, objective, tx))(
      state, {"input_ids": jnp.zeros((2, 4), jnp.int32)})
  assert float(m["learning_rate"]) == pytest.approx(0.1)
  before, new = _names(state.params), _names(after.params)
  kinds = set()
  for name, x in before.items():
    factor = (1 - 0.1 * 0.5) if decayed(name) else 1.0
    np.testing.assert_allclose(new[name], np.asarray(x) * factor, rtol=1e-6,
                               err_msg=name)
    kinds.add((name.split("/")[-1], decayed(name)))
  assert {("bias", False), ("scale", False), ("kernel", True), ("embedding", True),
          ("word_embeddings_delta", True)} <= kinds, kinds


def test_layer_stacked_update_equals_the_per_layer_update():
  """The train state is layer-stacked (`layer_groups`); one step must be the
  per-layer AdamW update, leaf for leaf, parameters and both moments (a wrong
  ungroup order, or a decay mask that misreads the grouped names, breaks it). The
  stacked tree's size does not grow with depth, and checkpoints' per-layer form
  round-trips."""
  from amos_jax.model import rng as rng_lib
  from amos_jax.train.layer_groups import group
  from amos_jax.train.state import per_layer_state, stack_state
  from tests.helpers import random_batch
  c = tiny_config("electra", num_layers=3)
  c.train.update(warmup_steps=0, learning_rate=0.01, weight_decay=0.1)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  objective = get_objective(c)
  tx = make_optimizer(c.train)
  graphdef, state, _ = create_train_state(
      objective, shd.build_mesh(c.mesh, jax.devices()[:1]), tx)
  batch = random_batch(jax.random.key(0), 8, 32, 64, pad_tail=3)
  after, _ = jax.jit(make_train_step(graphdef, objective, tx))(state, batch)

  per_layer = per_layer_state(state)
  per_layer_tx_state = tx.init(per_layer.params)   # optax on the per-layer tree

  @jax.jit
  def per_layer_update(params, opt_state):
    key = rng_lib.per_row(step_rng(c.train.seed, 0), jnp.arange(8, dtype=jnp.int32))
    grads = jax.grad(lambda p: objective.loss(
        nnx.merge(graphdef, p), batch, objective.loss_counts(batch), key, True)[0])(params)
    direction, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, jax.tree.map(lambda d: -0.01 * d, direction)), opt_state

  expected = per_layer_update(per_layer.params, per_layer_tx_state)
  got = per_layer_state(after)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path((got.params, got.opt_state))[0],
                          jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))

  grouped = state.params
  assert "discriminator/encoder/layer/*/attention/self/query/kernel" in grouped
  assert grouped["discriminator/encoder/layer/*/attention/self/query/kernel"].shape[0] == 3
  again = stack_state(per_layer)
  jax.tree.map(np.testing.assert_array_equal, again, state)
  assert jax.tree.structure(again) == jax.tree.structure(state)
  # Layer i of the per-layer form is row i of the stacked array.
  np.testing.assert_array_equal(
      per_layer.params["discriminator"]["encoder"]["layer"][2]["attention"]["self"]["query"]["kernel"][...],
      grouped["discriminator/encoder/layer/*/attention/self/query/kernel"][2])
  deeper = tiny_config("electra", num_layers=5)
  _, deeper_params = jax.eval_shape(lambda: nnx.split(
      get_objective(deeper).build_model(nnx.Rngs(0)), nnx.Param))
  assert len(jax.eval_shape(group, deeper_params)) == len(grouped) < len(jax.tree.leaves(per_layer.params))
