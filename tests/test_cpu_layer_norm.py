"""LayerNorm in the CPU custom calls (`model.layer_norm_impl=native`,
`native/layer_norm.cc`).

Forward values and (x, scale, bias) gradients must be the jnp formulas' (float32
rounding) for widths that are not multiples of the vectors, row counts that are not
multiples of a chunk, one row and none, with every kernel the CPU can run; the
parameter gradients must not depend on how the rows were shared among threads; a
bfloat16 model must keep the jnp formulas; and a train step must run every
LayerNorm through it with XLA's loss and gradient norm. Where 'auto' picks it:
tests/test_native_choice.py. The library must build here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amos_jax.model import cpu_layer_norm, native_lib, ops
from tests.helpers import each_isa

# (rows..., H): H against the vector widths (16, 8, 4), rows against the 128-row
# chunks of the kernel, the encoders' widths.
SHAPES = [(2, 5, 19), (300, 64), (1, 7), (3, 130, 256), (129, 3), (0, 8)]


def _inputs(shape, seed=0):
  r = np.random.default_rng(seed)
  h = shape[-1]
  x = jnp.asarray(3.0 * r.standard_normal(shape) + 1.5, jnp.float32)
  scale = jnp.asarray(1.0 + 0.1 * r.standard_normal(h), jnp.float32)
  bias = jnp.asarray(0.1 * r.standard_normal(h), jnp.float32)
  g = jnp.asarray(r.standard_normal(shape), jnp.float32)
  return x, scale, bias, g


def _run(implementation, x, scale, bias, g):
  def f(x, s, b):
    return ops.layer_norm(x, s, b, 1e-12, implementation)
  y, vjp = jax.vjp(jax.jit(f), x, scale, bias)
  return (y, *vjp(g))


def test_the_library_builds_and_loads():
  assert not native_lib.unavailable_reason(), native_lib.unavailable_reason()
  assert native_lib.isa(cpu_layer_norm.KERNEL) in ("avx512", "avx2", "generic")


def test_every_kernel_the_cpu_runs_equals_the_jnp_formulas():
  for isa in each_isa(cpu_layer_norm.KERNEL):
    for shape in SHAPES:
      args = _inputs(shape)
      want = _run("xla", *args)
      got = _run("native", *args)
      for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
        assert a.shape == b.shape, (isa, shape, name)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5,
                                   err_msg=f"{isa} {shape} {name}")


def test_the_custom_calls_run_and_the_statistics_are_the_rows():
  """The forward call's statistics are each row's mean and 1 / std (float64
  reference), and the lowered gradient runs both calls once."""
  x, scale, bias, g = _inputs((37, 40))
  _, stats = jax.jit(lambda x: cpu_layer_norm._forward(x, scale, bias, 1e-12))(x)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(stats[:, 0], x64.mean(-1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats[:, 1], 1 / np.sqrt(x64.var(-1) + 1e-12), rtol=1e-5)
  text = jax.jit(jax.grad(lambda x: jnp.vdot(ops.layer_norm(x, scale, bias, 1e-12), g))
                 ).lower(x).as_text()
  assert text.count(f"@{cpu_layer_norm.FORWARD}(") == 1
  assert text.count(f"@{cpu_layer_norm.BACKWARD}(") == 1


def test_parameter_gradients_do_not_depend_on_the_threads():
  """Partial sums per fixed chunk of rows, added in chunk order: calls give the same
  bits every time."""
  x, scale, bias, g = _inputs((1000, 48), seed=3)
  runs = [_run("native", x, scale, bias, g) for _ in range(5)]
  for later in runs[1:]:
    for a, b in zip(later, runs[0]):
      np.testing.assert_array_equal(a, b)


def test_a_bfloat16_model_keeps_the_jnp_formulas():
  x, scale, bias, _ = _inputs((4, 16))
  text = jax.jit(lambda x: ops.layer_norm(x.astype(jnp.bfloat16), scale, bias, 1e-12)
                 ).lower(x).as_text()
  assert cpu_layer_norm.FORWARD not in text


def test_a_train_step_through_it_is_xla_s():
  """ELECTRA's tiny step (layers scanned, remat auto = dots_saveable) runs every
  LayerNorm in the custom calls, with XLA's loss and gradient norm: per encoder the
  embeddings' one and the layer body's two, and the generator's MLM head one. Each
  backward call once; each forward call once, and again in the backward loop where
  remat recomputes the layer."""
  from tests.helpers import custom_calls_in_step
  targets = [cpu_layer_norm.FORWARD, cpu_layer_norm.BACKWARD]
  (fwd, bwd), native = custom_calls_in_step(targets, layer_norm_impl="auto")
  (none_f, none_b), xla = custom_calls_in_step(targets, layer_norm_impl="xla")
  assert none_f == none_b == 0
  per_step = 2 * (1 + 2) + 1
  assert bwd == per_step, bwd
  assert fwd == per_step + 2 * 2, fwd
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(native[key], xla[key], rtol=1e-5, err_msg=key)
