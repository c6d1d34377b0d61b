import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amos_jax.objectives import masking

CFG = masking.MaskingConfig(mask_rate=0.15, scheme="bert", mask_id=4, vocab_size=1000)


def _batch(b=64, t=128):
  ids = jax.random.randint(jax.random.key(0), (b, t), 5, 1000).astype(jnp.int32)
  ids = ids.at[:, 0].set(2).at[:, -1].set(3)   # [CLS] ... [SEP]
  seg = jnp.ones((b, t), jnp.int32).at[1::2, 100:].set(0)
  ids = jnp.where(seg == 0, 0, ids)
  return ids, seg


def test_mask_rate_specials_and_labels():
  ids, seg = _batch()
  m = masking.mask_tokens(jax.random.key(1), ids, seg, CFG)
  k = CFG.num_slots(ids.shape[1])
  assert m.positions.shape == (64, k)
  w = np.asarray(m.weights) > 0
  maskable = ((np.asarray(seg) > 0) & (np.asarray(ids) > 4)).sum(1)
  np.testing.assert_array_equal(w.sum(1), np.clip(np.round(0.15 * maskable), 1, k))
  chosen = np.take_along_axis(np.asarray(ids), np.asarray(m.positions), 1)
  assert (chosen[w] > 4).all(), "special or padding tokens were selected"
  np.testing.assert_array_equal(np.asarray(m.labels), chosen)
  # Unselected positions are untouched.
  changed = np.asarray(m.input_ids) != np.asarray(ids)
  sel = np.zeros_like(changed)
  np.put_along_axis(sel, np.asarray(m.positions), w, 1)
  assert not (changed & ~sel).any()


@pytest.mark.parametrize("scheme,p_mask,p_random", [("bert", 0.8, 0.1),
                                                    ("electra", 0.85, 0.0)])
def test_replacement_scheme_proportions(scheme, p_mask, p_random):
  ids, seg = _batch(256)
  cfg = masking.MaskingConfig(scheme=scheme, mask_id=4, vocab_size=1000)
  m = masking.mask_tokens(jax.random.key(2), ids, seg, cfg)
  w = np.asarray(m.weights) > 0
  new = np.take_along_axis(np.asarray(m.input_ids), np.asarray(m.positions), 1)[w]
  orig = np.asarray(m.labels)[w]
  frac_mask = (new == 4).mean()
  frac_keep = (new == orig).mean()
  assert abs(frac_mask - p_mask) < 0.02
  assert abs(frac_keep - (1 - p_mask - p_random)) < 0.02 + 0.001


def test_masks_are_a_function_of_the_key():
  ids, seg = _batch(8)
  a = masking.mask_tokens(jax.random.key(3), ids, seg, CFG)
  b = masking.mask_tokens(jax.random.key(3), ids, seg, CFG)
  c = masking.mask_tokens(jax.random.key(4), ids, seg, CFG)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  assert (np.asarray(a.positions) != np.asarray(c.positions)).any()


def test_whole_word_masking_takes_whole_words():
  b, t = 32, 64
  ids = jax.random.randint(jax.random.key(0), (b, t), 5, 1000).astype(jnp.int32)
  seg = jnp.ones((b, t), jnp.int32)
  # Words of 3 tokens each.
  starts = (jnp.arange(t) % 3 == 0).astype(jnp.int32)[None].repeat(b, 0)
  cfg = masking.MaskingConfig(mask_rate=0.15, whole_word=True, max_predictions=30,
                              mask_id=4, vocab_size=1000)
  m = masking.mask_tokens(jax.random.key(5), ids, seg, cfg, starts)
  sel = np.zeros((b, t), bool)
  np.put_along_axis(sel, np.asarray(m.positions), np.asarray(m.weights) > 0, 1)
  words = sel.reshape(b, t // 3 + (t % 3 > 0) * 0, -1) if t % 3 == 0 else sel[:, :63].reshape(b, 21, 3)
  partial = (words.any(-1) & ~words.all(-1)).sum(1)
  assert (partial <= 1).all(), "a word was split (beyond the cut at the budget)"
