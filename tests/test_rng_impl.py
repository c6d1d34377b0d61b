"""`train.rng_impl`: every bit generator keeps per-row determinism (a row's draws
depend on its key alone, so micro-batches draw what the whole batch draws) and is a
function of (seed, step), so a resumed run draws what the uninterrupted one did."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amos_jax.model import rng as rng_lib
from amos_jax.train.step import step_rng


@pytest.mark.parametrize("impl", ["threefry", "rbg", "unsafe_rbg"])
def test_rows_draw_from_their_own_key(impl):
  rows = rng_lib.per_row(step_rng(0, 7, impl), jnp.arange(6))
  bern = lambda k, s: jax.random.bernoulli(k, 0.9, s)
  full = jax.jit(lambda r: rng_lib.draw(bern, r, (6, 4, 16)))(rows)
  odd = jax.jit(lambda r: rng_lib.draw(bern, r, (3, 4, 16)))(rows[1::2])
  np.testing.assert_array_equal(full[1::2], odd)
  np.testing.assert_array_equal(full[3], bern(rows[3], (4, 16)))
  again = jax.jit(lambda r: rng_lib.draw(bern, r, (6, 4, 16)))(
      rng_lib.per_row(step_rng(0, 7, impl), jnp.arange(6)))
  np.testing.assert_array_equal(full, again)
  assert 0.8 < float(full.mean()) < 1.0


@pytest.mark.parametrize("impl", ["threefry", "rbg"])
def test_dropout_keeps_at_the_configured_rate_per_row(impl):
  rows = rng_lib.per_row(step_rng(0, 3, impl), jnp.arange(4))
  keep, scale = jax.jit(lambda r: rng_lib.dropout_keep(r, 0.1, (4, 2, 64, 63)))(rows)
  assert keep.shape == (4, 2, 64, 63) and scale == pytest.approx(1 / 0.9, rel=1e-4)
  assert abs(float(keep.mean()) - 0.9) < 0.01
  one, _ = rng_lib.dropout_keep(rows[2], 0.1, (2, 64, 63))
  np.testing.assert_array_equal(keep[2], one)
  assert not np.array_equal(keep[0], keep[1])


@pytest.mark.parametrize("key", [jax.random.key(3), jax.random.PRNGKey(11),
                                 jax.random.fold_in(jax.random.key(1), 5)])
def test_written_out_threefry_is_jax_threefry_bit_for_bit(key):
  # JAX's own partitionable threefry is the reference: its bits are w1 ^ w2 of the
  # same counters, and split(key, n) holds (w1, w2) of counters 0..n-1.
  w1, w2 = jax.jit(lambda k: rng_lib.bits_2x32(k, (5, 7)))(key)
  np.testing.assert_array_equal(w1 ^ w2, jax.random.bits(key, (5, 7), jnp.uint32))
  split = jax.random.split(key, 6)
  data = jax.random.key_data(split) if jax.dtypes.issubdtype(
      split.dtype, jax.dtypes.prng_key) else split
  v1, v2 = rng_lib.bits_2x32(key, (6,))
  np.testing.assert_array_equal(data[:, 0], v1)
  np.testing.assert_array_equal(data[:, 1], v2)


def test_dropout_decisions_are_independent_quarters():
  # Four decisions come from one 64-bit hash: each quarter must be its own
  # Bernoulli draw, so neighbours in a row (one hash) are uncorrelated.
  keep, _ = rng_lib.dropout_keep(jax.random.key(0), 0.5, (256, 1024))
  k = np.asarray(keep, np.float64)
  assert abs(k.mean() - 0.5) < 0.005
  for lag in (1, 256, 512):  # a quarter's neighbour, the next quarter of the same hash
    c = np.corrcoef(k[:, :-lag].ravel(), k[:, lag:].ravel())[0, 1]
    assert abs(c) < 0.01, (lag, c)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (float(np.finfo(np.float32).tiny), 1.0),
                                    (-2.0, 3.0)])
def test_uniform_is_jax_uniform_bit_for_bit(bounds):
  # The samplers' uniforms (Gumbel noise, inverse CDF) changed generator code, not
  # values: every float equals jax.random.uniform's, per key and per row.
  lo, hi = bounds
  key = jax.random.key(5)
  got = jax.jit(lambda k: rng_lib.uniform(k, (4, 33), lo, hi))(key)
  np.testing.assert_array_equal(got, jax.random.uniform(key, (4, 33), jnp.float32, lo, hi))
  rows = rng_lib.per_row(key, jnp.arange(3))
  got = rng_lib.draw(lambda k, s: rng_lib.uniform(k, s, lo, hi), rows, (3, 50))
  want = rng_lib.draw(lambda k, s: jax.random.uniform(k, s, jnp.float32, lo, hi), rows, (3, 50))
  np.testing.assert_array_equal(got, want)
