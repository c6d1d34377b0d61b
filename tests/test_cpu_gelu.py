"""The exact GELU's backward pass in the CPU custom call (`model.gelu_impl=native`,
`native/gelu.cc`).

g * GELU'(x) must be the jnp formula's (float32 rounding) and within float32 of a
float64 erf/exp reference over the whole float range that matters (erf saturating
past 3.74, exp underflowing far out, zeros), for sizes that are not multiples of the
vectors, with every kernel the CPU can run; and a train step must run every GELU's
backward pass through it with XLA's loss and gradient norm. Where 'auto' picks it:
tests/test_native_choice.py. The library must build here.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amos_jax.model import cpu_gelu, native_lib, ops
from tests.helpers import each_isa


def _backward(implementation, x, g):
  return jax.jit(lambda x, g: jax.vjp(lambda x: ops.gelu(x, implementation), x)[1](g)[0])(x, g)


def _reference(x, g):
  """float64 g * (Phi(x) + x phi(x))."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  return g * (cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))


def test_the_library_builds_and_loads():
  assert not native_lib.unavailable_reason(), native_lib.unavailable_reason()
  assert native_lib.isa(cpu_gelu.KERNEL) in ("avx512", "avx2", "generic")


@pytest.mark.parametrize("shape", [(3, 7), (1, 16), (5, 33, 17), (0, 4)])
def test_every_kernel_the_cpu_runs_equals_the_formula(shape):
  r = np.random.default_rng(0)
  x = jnp.asarray(4.0 * r.standard_normal(shape), jnp.float32)
  g = jnp.asarray(r.standard_normal(shape), jnp.float32)
  want = _backward("xla", x, g)
  for isa in each_isa(cpu_gelu.KERNEL):
    got = _backward("native", x, g)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=isa)


def test_it_is_float32_exact_over_the_range():
  """Past |x| = 3.74 erf is +-1, past |x| = 13.2 exp(-x^2 / 2) underflows, x = 0
  gives 1/2: within 1e-6 of the float64 values everywhere, as XLA's own form."""
  x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 60001), jnp.array([0.0, -0.0, 1e-30])])
  x = x.astype(jnp.float32).reshape(1, -1)
  g = jnp.ones_like(x)
  want = _reference(x, g)
  for isa in each_isa(cpu_gelu.KERNEL):
    got = np.asarray(_backward("native", x, g), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=isa)
  np.testing.assert_allclose(np.asarray(_backward("xla", x, g), np.float64), want,
                             rtol=0, atol=1e-6)


def test_a_train_step_through_it_is_xla_s():
  """ELECTRA's tiny step runs every GELU's backward pass in the custom call: per
  encoder the layer body's one, the generator's MLM head and the discriminator's
  RTD head one each; with XLA's loss and gradient norm."""
  from tests.helpers import custom_calls_in_step
  (calls,), native = custom_calls_in_step([cpu_gelu.TARGET], gelu_impl="auto")
  (none,), xla = custom_calls_in_step([cpu_gelu.TARGET], gelu_impl="xla")
  assert none == 0 and calls == 2 * 1 + 2, calls
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(native[key], xla[key], rtol=1e-5, err_msg=key)
