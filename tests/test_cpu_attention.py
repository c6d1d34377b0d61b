"""Attention's core fused in one CPU custom call (`model.attention_impl=fused`).

Scores, mask, softmax, dropout and context per (batch, head) in `native/attention.cc`,
the backward pass computing the tile again: it must give XLA attention's outputs and
gradients (float32 rounding) with padding, a fully masked row, cross-attention
shapes, sizes that are not multiples of the vectors, dropout with a key per row or
one key (the same masks as `rng.dropout_keep`, so the same numbers), with every
kernel the CPU can run; fall back to gemm where it has no form (a bias, rbg keys);
and give a train step XLA's loss and gradient norm. The library must build here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from amos_jax.model import attention, cpu_attention, native_lib
from amos_jax.model import rng as rng_lib
from tests.helpers import each_isa


def _inputs(b, t, s, n, d, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((b, t, n, d)), jnp.float32)
  k, v = (jnp.asarray(r.standard_normal((b, s, n, d)), jnp.float32) for _ in range(2))
  lengths = np.maximum(1, s - 5 * np.arange(b))  # padded rows; the last may attend one
  mask = np.arange(s)[None, None, None, :] < lengths[:, None, None, None]
  mask = np.broadcast_to(mask, (b, 1, t, s)).copy()
  w = jnp.asarray(r.standard_normal((b, t, n, d)), jnp.float32)
  return q, k, v, mask, w


def _run(impl, q, k, v, mask, w, dropout, rng):
  def loss(q, k, v):
    ctx = attention.dot_product_attention(
        q, k, v, jnp.asarray(mask), dropout_rate=dropout,
        dropout_rng=rng if dropout else None, implementation=impl)
    return jnp.sum(ctx * w), ctx
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, ctx), grads = fn(q, k, v)
  return ctx, grads, fn.lower(q, k, v).as_text()


def _assert_like_xla(q, k, v, mask, w, dropout, rng, label=""):
  ctx_x, g_x, text_x = _run("xla", q, k, v, mask, w, dropout, rng)
  ctx_f, g_f, text_f = _run("fused", q, k, v, mask, w, dropout, rng)
  assert cpu_attention.FORWARD not in text_x
  assert text_f.count(f"@{cpu_attention.FORWARD}(") == 1, label
  assert text_f.count(f"@{cpu_attention.BACKWARD}(") == 1, label
  np.testing.assert_allclose(ctx_f, ctx_x, rtol=1e-5, atol=2e-6, err_msg=label)
  for name, a, b in zip("qkv", g_f, g_x):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=f"{label} d{name}")


def test_the_library_builds_and_loads():
  assert not native_lib.unavailable_reason(), native_lib.unavailable_reason()
  assert cpu_attention.isa() in ("avx512", "avx2", "generic")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
# S = 64: every kernel hashes a row's dropout flags straight into vectors (its
# ceil(S / 4) counters a multiple of the vector width); the others go through bytes.
@pytest.mark.parametrize("sizes", [(3, 12, 12, 2, 8), (2, 13, 13, 3, 5), (2, 9, 21, 2, 16),
                                   (1, 40, 40, 1, 64), (2, 24, 64, 2, 16)])
def test_fused_attention_equals_xla_attention(sizes, dropout):
  q, k, v, mask, w = _inputs(*sizes)
  rows = rng_lib.per_row(jax.random.key(5), jnp.arange(sizes[0]))
  _assert_like_xla(q, k, v, mask, w, dropout, rows, f"{sizes} per-row keys")
  if dropout:
    _assert_like_xla(q, k, v, mask, w, dropout, jax.random.key(9), f"{sizes} one key")


def test_a_fully_masked_row_is_uniform_and_passes_no_gradient_to_its_scores():
  q, k, v, mask, w = _inputs(2, 6, 6, 2, 4)
  mask[1, 0, 2, :] = False  # query 2 of row 1 attends nothing
  _assert_like_xla(q, k, v, mask, w, 0.2, rng_lib.per_row(jax.random.key(1), jnp.arange(2)))
  ctx, _, _ = _run("fused", q, k, v, mask, w, 0.0, None)
  np.testing.assert_allclose(ctx[1, 2], jnp.mean(v[1], axis=0), rtol=1e-5, atol=1e-6)


def test_the_one_mask_for_every_row_form():
  """A (1, 1, T, S) mask is read for every row (its batch stride is 0)."""
  q, k, v, mask, w = _inputs(3, 10, 10, 2, 8)
  one = mask[:1]
  ctx_f, _, _ = _run("fused", q, k, v, one, w, 0.2, jax.random.key(3))
  ctx_x, _, _ = _run("xla", q, k, v, one, w, 0.2, jax.random.key(3))
  np.testing.assert_allclose(ctx_f, ctx_x, rtol=1e-5, atol=2e-6)


def test_every_kernel_the_cpu_runs_gives_the_same_attention():
  rows = rng_lib.per_row(jax.random.key(2), jnp.arange(2))
  for isa in each_isa("amos_attention"):
    for sizes in ((2, 37, 37, 3, 19), (2, 20, 64, 2, 32)):
      q, k, v, mask, w = _inputs(*sizes, seed=4)
      _assert_like_xla(q, k, v, mask, w, 0.1, rows, f"{isa} {sizes}")


def _mesh(**axes):
  names = tuple(axes)
  return AbstractMesh(tuple(axes.values()), names, axis_types=(AxisType.Auto,) * len(names))


def test_auto_picks_fused_where_the_cpu_kernels_run():
  resolve = attention.resolve_implementation
  one = _mesh(data=1)
  assert resolve("auto", jnp.float32, 64, platform="cpu", mesh=one) == "fused"
  assert resolve("fused", jnp.float32, 64, platform="cpu", mesh=one) == "fused"
  assert resolve("gemm", jnp.float32, 64, platform="cpu", mesh=one) == "gemm"
  assert resolve("auto", jnp.float32, 64, platform="tpu", mesh=one) == "xla"
  assert resolve("auto", jnp.bfloat16, 64, platform="cpu", mesh=one) == "xla"
  assert resolve("fused", jnp.float32, 64, platform="cpu", mesh=_mesh(data=2)) == "xla"


@pytest.mark.parametrize("case", ["bias", "rbg", "mask"])
def test_where_fused_has_no_form_gemm_runs_with_one_warning(case, caplog):
  q, k, v, mask, w = _inputs(2, 8, 8, 2, 4)
  bias = jnp.ones((1, 2, 8, 8)) if case == "bias" else None
  rng = jax.random.key(0, impl="rbg") if case == "rbg" else jax.random.key(0)
  if case == "mask":  # one mask per head
    mask = np.broadcast_to(mask, (2, 2, 8, 8)).copy()
  rng_lib.warn_once.cache_clear()
  with caplog.at_level("WARNING", logger="amos_jax"):
    text = jax.jit(lambda q: attention.dot_product_attention(
        q, k, v, jnp.asarray(mask), bias, dropout_rate=0.1, dropout_rng=rng,
        implementation="fused")).lower(q).as_text()
  assert cpu_attention.FORWARD not in text and "amos_batched_matmul" in text
  assert "attention_impl=fused" in caplog.text
  assert {"bias": "bias", "rbg": "threefry", "mask": "(2, 2, 8, 8)"}[case] in caplog.text
  rng_lib.warn_once.cache_clear()


def _electra_step(impl: str, remat: str):
  from tests.helpers import custom_calls_in_step
  return custom_calls_in_step([cpu_attention.FORWARD, cpu_attention.BACKWARD],
                              attention_impl=impl, remat=remat)


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_a_train_step_with_fused_attention_is_xla_s(remat):
  """The ELECTRA step (scanned layers, attention dropout): one forward and one
  backward call per encoder's layer body under dots_saveable (the context is kept
  by name); full remat runs the forward again in the backward pass."""
  calls, fused = _electra_step("fused", remat)
  none, xla = _electra_step("xla", remat)
  assert none == (0, 0)
  assert calls == ((2, 2) if remat == "dots_saveable" else (4, 2))
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(fused[key], xla[key], rtol=1e-5, err_msg=key)


_FIRST_CALL_CHILD = """
import jax, jax.numpy as jnp
from amos_jax.model import cpu_attention
from amos_jax.model import rng as rng_lib
q = jnp.ones((1, 4, 1, 8))
mask = jnp.ones((1, 1, 4, 4), bool)
print(cpu_attention.attention(q, q, q, mask, cpu_attention.key_words(None), 0.3, None).shape)
print(rng_lib._native_keep(jax.random.key(0), (3, 5), 40000).shape)
"""


def test_the_custom_calls_load_their_library_on_their_first_call():
  """Called first thing in a process, before anything resolved an implementation
  (which loads the library), they still find their FFI targets registered."""
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-c", _FIRST_CALL_CHILD], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split("\n")[:2] == ["(1, 4, 1, 8)", "(3, 5)"], r.stdout
