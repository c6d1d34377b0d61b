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
