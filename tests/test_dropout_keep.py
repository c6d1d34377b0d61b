"""Dropout's keep masks in the CPU custom call (`model.dropout_impl=native`).

The custom call must draw exactly the masks XLA's form draws (`rng._keep_bits`), bit
for bit, with every kernel the CPU can run, at sizes that are not multiples of its
vectors, per row and for one key; and both must be the Bernoulli decisions that
JAX's own threefry counters give (`jax.random.split` holds both words of each
hash). 'auto' must pick it only where it runs, and a train step with it must give
the loss and gradients of one with XLA's masks. The library must build here, as for
test_cpu_matmul.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from amos_jax.model import native_lib
from amos_jax.model import rng as rng_lib
from tests.helpers import each_isa

THRESHOLD = int(round(0.9 * 65536))
# (rows, ..., n): n below, at and above the vector widths, not multiples of 4 too.
SHAPES = [(3, 4, 8, 128), (3, 16, 256), (2, 5, 7), (2, 3, 1), (2, 2, 2), (2, 1, 3),
          (2, 6, 67), (1, 2, 130), (2, 9, 257), (2, 300, 130)]  # the last: 2 items per row


def _native(rng, shape):
  return np.asarray(jax.jit(lambda k: rng_lib._native_keep(k, shape, THRESHOLD))(rng))


def _xla(rng, shape):
  return np.asarray(jax.jit(lambda k: rng_lib.draw(
      lambda kk, s: rng_lib._keep_bits(kk, s, THRESHOLD), k, shape))(rng))


def _reference(key, row_shape):
  """One key's mask from JAX's threefry: split(key, c) holds (w1, w2) of counters
  0..c-1; the row's four 16-bit quarters are laid side by side, m = ceil(n / 4)."""
  n = row_shape[-1]
  m = (n + 3) // 4
  prefixes = int(np.prod(row_shape[:-1], dtype=np.int64))
  words = np.asarray(jax.random.key_data(jax.random.split(key, prefixes * m)))
  w1, w2 = (words[:, i].reshape(prefixes, m).astype(np.int64) for i in (0, 1))
  quarters = np.concatenate([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], axis=1)
  return (quarters[:, :n] < THRESHOLD).reshape(row_shape)


def test_the_library_builds_and_loads():
  assert not native_lib.unavailable_reason(), native_lib.unavailable_reason()


@pytest.mark.parametrize("shape", SHAPES)
def test_native_masks_are_xla_s_bit_for_bit_per_row_and_for_one_key(shape):
  rows = rng_lib.per_row(jax.random.key(7), jnp.arange(shape[0]))
  native = _native(rows, shape)
  np.testing.assert_array_equal(native, _xla(rows, shape))
  one = jax.random.key(11)
  np.testing.assert_array_equal(_native(one, shape[1:]), _xla(one, shape[1:]))
  np.testing.assert_array_equal(_native(one, shape[1:]), _reference(one, shape[1:]))
  for r in range(shape[0]):  # a row's mask depends on its key alone
    np.testing.assert_array_equal(native[r], _reference(rows[r], shape[1:]))


def test_every_kernel_the_cpu_runs_draws_the_same_masks():
  rows = rng_lib.per_row(jax.random.key(3), jnp.arange(2))
  for isa in each_isa("amos_dropout_keep"):
    for shape in [(2, 5, 67), (2, 3, 35), (2, 4, 130)]:
      # A fresh trace each time: the kernel is chosen when the call runs.
      got = np.asarray(rng_lib._native_keep(rows, shape, THRESHOLD))
      np.testing.assert_array_equal(got, _xla(rows, shape), err_msg=f"{isa} {shape}")


def test_the_keep_rate_and_scale_are_dropout_s():
  mask, scale = jax.jit(lambda k: rng_lib.dropout_keep(k, 0.25, (64, 4096), "native"))(
      jax.random.key(0))
  assert abs(float(np.mean(mask)) - 0.75) < 0.005
  assert scale == 65536.0 / int(round(0.75 * 65536))


def _mesh(**axes):
  names = tuple(axes)
  return AbstractMesh(tuple(axes.values()), names, axis_types=(AxisType.Auto,) * len(names))


def test_auto_picks_native_only_where_it_runs(caplog):
  resolve = rng_lib.resolve_dropout_impl
  key, one = jax.random.key(0), _mesh(data=1, fsdp=1)
  assert resolve("auto", key, "cpu", one) == "native"
  assert resolve(None, key, "cpu", one) == "native"
  assert resolve("native", key, "cpu", one) == "native"
  assert resolve("auto", jax.random.key_data(key), "cpu", one) == "native"  # raw uint32[2]
  # Another backend, a mesh XLA partitions itself, or another bit generator.
  assert resolve("auto", key, "tpu", one) == "xla"
  assert resolve("auto", key, "cpu", _mesh(data=2)) == "xla"
  assert resolve("auto", jax.random.key(0, impl="rbg"), "cpu", one) == "xla"
  assert resolve("xla", key, "cpu", one) == "xla"
  manual = AbstractMesh((2,), ("data",), axis_types=(AxisType.Manual,))
  assert resolve("auto", key, "cpu", manual) == "native"
  rng_lib.warn_once.cache_clear()
  with caplog.at_level("WARNING", logger="amos_jax"):
    assert resolve("native", jax.random.key(0, impl="rbg"), "cpu", one) == "xla"
  assert "dropout_impl=native" in caplog.text and "threefry" in caplog.text
  with pytest.raises(ValueError, match="dropout_impl='fast'"):
    resolve("fast", key, "cpu", one)
  rng_lib.warn_once.cache_clear()


def _electra_step(impl: str):
  from tests.helpers import custom_calls_in_step
  (calls,), metrics = custom_calls_in_step([rng_lib.NATIVE_KEEP], dropout_impl=impl,
                                           attention_impl="gemm")
  return calls, metrics


def test_a_train_step_with_native_masks_is_xla_s():
  """ELECTRA's step (gemm attention, which draws its masks apart) draws its hidden
  and attention dropout masks in the custom call (embeddings 1 + per layer body 3,
  in each encoder), with XLA's loss and gradient norm: the same masks, so the same
  numbers."""
  calls, native = _electra_step("auto")
  none, xla = _electra_step("xla")
  assert none == 0 and calls == 2 * (1 + 3)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(native[key], xla[key], rtol=1e-6, err_msg=key)
