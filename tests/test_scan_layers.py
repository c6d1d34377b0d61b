"""Layers under lax.scan compute what the unrolled stack computes: hidden states,
losses and gradients (with dropout and AMOS's stop-gradient taps), under every remat
policy, with the per-layer parameter names unchanged."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.model import rng as rng_lib
from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.objectives import get_objective
from amos_jax.train import bench
from tests.helpers import random_batch, tiny_config, tiny_train_step

CFG = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4,
                    intermediate_size=64, embedding_size=16, max_position_embeddings=32,
                    hidden_dropout=0.1, attention_dropout=0.1)


def _flat(state):
  return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _assert_trees_close(a, b, rtol=1e-4):
  """Equal up to float32 rounding, relative to the gradient's overall scale (some
  entries are exactly zero in theory and ~1e-13 in practice)."""
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  scale = max(float(np.abs(v).max()) for v in a.values())
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6 * scale, err_msg=k)


def _encoder_grads(cfg, stop_gradient_after=()):
  """Hidden states, and the gradient of a random readout of all of them."""
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  ids = jax.random.randint(jax.random.key(0), (2, 8), 5, 50)
  seg = jnp.asarray([[1] * 8, [1] * 5 + [2] * 2 + [0]], jnp.int32)
  w = jax.random.normal(jax.random.key(1), (cfg.num_layers, 2, 8, 32))
  rng = rng_lib.per_row(jax.random.key(3), jnp.arange(2))

  def readout(p):
    hs = nnx.merge(graphdef, p)(ids, seg, dropout_rng=rng,
                                stop_gradient_after=stop_gradient_after)
    return sum(jnp.sum(h * w[i]) for i, h in enumerate(hs[1:])), hs

  (_, hs), grads = jax.jit(jax.value_and_grad(readout, has_aux=True))(params)
  return hs, grads, params


def test_scanned_encoder_equals_unrolled_under_every_remat_policy():
  """Same hidden states (dropout on, a packed row) and gradients, a tap included:
  the unrolled stack without remat against the scanned one with each policy."""
  hs0, g0, p0 = _encoder_grads(dataclasses.replace(CFG, scan_layers=False),
                               stop_gradient_after=(1,))
  for remat in ("auto", "none", "dots_saveable", "full"):
    hs1, g1, p1 = _encoder_grads(dataclasses.replace(CFG, scan_layers=True, remat=remat),
                                 stop_gradient_after=(1,))
    assert set(_flat(p0)) == set(_flat(p1))
    assert any(k.startswith("encoder/layer/2/") for k in _flat(p1))
    assert len(hs1) == CFG.num_layers + 1
    for a, b in zip(hs0, hs1):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    _assert_trees_close(g0, g1)


def test_auto_remat_recomputes_under_scan_only():
  """remat='auto' wraps the scanned layer in jax.checkpoint (dots saved, the
  elementwise ops recomputed) and leaves unrolled layers as they are."""
  ids = jnp.ones((2, 8), jnp.int32)

  def remat_calls(cfg):
    graphdef, params = nnx.split(Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids, ids)[-1])(params)
    return len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jaxpr)))  # jax.checkpoint

  assert remat_calls(dataclasses.replace(CFG, scan_layers=True, remat="auto")) == 1
  assert remat_calls(dataclasses.replace(CFG, scan_layers=True, remat="none")) == 0
  assert remat_calls(dataclasses.replace(CFG, scan_layers=False, remat="auto")) == 0
  assert remat_calls(dataclasses.replace(CFG, scan_layers=False,
                                         remat="dots_saveable")) == CFG.num_layers


@pytest.mark.parametrize("attention_impl", ["xla", "fused"])
@pytest.mark.parametrize("scan", [True, False])
def test_dots_saveable_keeps_the_dropout_masks(scan, attention_impl, capsys):
  """Under dots_saveable the backward pass reads each layer's dropout masks
  (attention probabilities, attention output, FFN output: bool residuals) instead of
  hashing their random bits again. The fused attention kernel keeps no (B, N, T, S)
  array: its backward pass hashes the probabilities' masks again in the tile."""
  cfg = dataclasses.replace(CFG, scan_layers=scan, remat="dots_saveable",
                            attention_impl=attention_impl)
  graphdef, params = nnx.split(Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  ids = jnp.ones((2, 8), jnp.int32)
  rng = rng_lib.per_row(jax.random.key(3), jnp.arange(2))
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: nnx.merge(graphdef, p)(ids, ids, dropout_rng=rng)[-1].sum(), params)
  masks = re.findall(r"^bool\[([\d,]+)\]", capsys.readouterr().out, re.M)
  masks = [m for m in masks if m != "2,1,8,8"]  # the attention (padding) mask
  layers = "3," if scan else ""
  per_layer = [f"{layers}2,8,32", f"{layers}2,8,32"]
  if attention_impl == "xla":
    per_layer.append(f"{layers}2,4,8,8")
  embeddings = ["2,8,16"]  # the embedding block's dropout, outside the layers
  assert sorted(masks) == sorted(embeddings + per_layer * (1 if scan else CFG.num_layers))


@pytest.mark.parametrize("scan", [True, False])
def test_dots_saveable_recomputes_no_product(scan):
  """dots_saveable keeps every product's output, so the backward pass runs the same
  matrix products as without remat (counted in the compiled HLO, loops' trip counts
  included) and `full` runs more. ops.dense hides its product from the policy, so
  this holds only while the policy also keeps the named dense outputs."""
  ids = jnp.ones((2, 8), jnp.int32)
  rng = rng_lib.per_row(jax.random.key(3), jnp.arange(2))

  def product_flops(remat):
    cfg = dataclasses.replace(CFG, scan_layers=scan, remat=remat)
    graphdef, params = nnx.split(Encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grad = jax.jit(jax.grad(
        lambda p: nnx.merge(graphdef, p)(ids, ids, dropout_rng=rng)[-1].sum()))
    dots = bench.hlo_dots(grad.lower(params).compile().as_text())
    return sum(d.flops * d.count for d in dots)

  none = product_flops("none")
  assert product_flops("dots_saveable") == none
  assert product_flops("full") > none


@pytest.mark.parametrize("name", ["electra", "amos"])
def test_scanned_objective_equals_unrolled(name):
  """The full objective (dropout, masks, samples; AMOS taps at 1 and 3): equal loss
  and gradients with and without the scan."""
  results = []
  for scan in (False, True):
    cfg = tiny_config(name, num_layers=3, hidden_dropout=0.1, attention_dropout=0.1,
                      scan_layers=scan)
    if name == "amos":
      cfg.objective.generator.update(tap_layers=(1, 3), dropout=True)
    objective = get_objective(cfg)
    graphdef, params = nnx.split(objective.build_model(nnx.Rngs(0)), nnx.Param)
    batch = random_batch(jax.random.key(0), 4, 32, 64, pad_tail=5)
    rng = rng_lib.per_row(jax.random.key(5), jnp.arange(4))

    def f(p):
      return objective.loss(nnx.merge(graphdef, p), batch, objective.loss_counts(batch),
                            rng, True)

    results.append(jax.jit(jax.value_and_grad(f, has_aux=True))(params))
  ((l0, m0), g0), ((l1, m1), g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for k in m0:
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-6, err_msg=k)
  _assert_trees_close(g0, g1)


def test_num_layers_runs_only_the_first_layers():
  cfg = dataclasses.replace(CFG, hidden_dropout=0.0, attention_dropout=0.0)
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(0), (2, 8), 5, 50)
  seg = jnp.ones((2, 8), jnp.int32)
  full = model(ids, seg)
  first_two = model(ids, seg, num_layers=2)
  assert len(first_two) == 3
  np.testing.assert_allclose(first_two[-1], full[2], rtol=1e-5, atol=1e-6)


def test_attention_impl_falls_back_to_xla_where_cudnn_cannot_run():
  from amos_jax.model.attention import resolve_implementation
  assert resolve_implementation("auto", jnp.bfloat16, 64, platform="cpu") == "xla"
  assert resolve_implementation("cudnn", jnp.bfloat16, 64, platform="tpu") == "xla"
  assert resolve_implementation("auto", jnp.float32, 64, platform="tpu") == "xla"
  assert resolve_implementation("xla", jnp.bfloat16, 64, platform="gpu") == "xla"
  with pytest.raises(ValueError, match="attention_impl"):
    resolve_implementation("flash", jnp.bfloat16, 64, platform="cpu")


def _compiled_step_size(name: str, num_layers: int) -> int:
  """HLO instructions in the compiled train step (the trainer's stacked state)."""
  step, state, batch = tiny_train_step(name, num_layers=num_layers, hidden_dropout=0.1,
                                       attention_dropout=0.1, scan_layers=True)
  compiled = step.lower(state, batch).compile()
  return sum(" = " in line for line in compiled.as_text().splitlines())


@pytest.mark.parametrize("name", ["electra", "amos"])
def test_compiled_step_does_not_grow_with_depth(name):
  """With scanned layers and the layer-stacked state, the compiled step is one
  program whatever the depth: 2 -> 6 layers adds a few instructions, not a copy of
  the layer (per-layer state or indexed layer views add hundreds per layer)."""
  small, deep = _compiled_step_size(name, 2), _compiled_step_size(name, 6)
  assert deep - small <= 4 * 4, (small, deep)
