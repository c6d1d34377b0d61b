"""The grain pipeline: determinism, resume, process sharding, packing, bad input."""
import collections
import os

import numpy as np
import pytest

from amos_jax.data import corpus
from amos_jax.data import pipeline as pl
from amos_jax.data import prepare
from amos_jax.data import records
from amos_jax.data import tokenizer as tk
from amos_jax.errors import ConfigError, DataError

T = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Long Wikipedia articles (split across rows; cut to 3000 characters to keep the
  set a few hundred rows) mixed with short news items."""
  root = tmp_path_factory.mktemp("pipeline")
  docs = corpus.demo_documents()
  # The news corpus repeats a few items; distinct documents make pieces identifiable.
  mixed = list(dict.fromkeys(d[:3000] for d in docs[:12] + docs[-80:]))
  tok = tk.train_sentencepiece(mixed, vocab_size=600, model_type="bpe")
  tok_dir = tok.save(str(root / "tok"))
  text = root / "docs.txt"
  text.write_text("\n".join(mixed) + "\n")
  prepare.prepare([str(text)], str(root / "data"), tokenizer=tok_dir, num_shards=3,
                  progress=False)
  return str(root / "data")


def _cfg(data_dir, **kw):
  kw = dict(dict(seq_len=T, global_batch_size=8, process_index=0, process_count=1), **kw)
  return pl.PipelineConfig(data_dir, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _all(cfg):
  return list(pl.make_iterator(cfg))


def _pieces(batches):
  """Every packed piece as a tuple of its token ids."""
  out = []
  for b in batches:
    for ids, seg in zip(b["input_ids"], b["segment_ids"]):
      for s in range(1, seg.max() + 1):
        out.append(tuple(ids[seg == s]))
  return out


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(a, b))


def test_batch_layout(data_dir):
  cls_id, sep_id = 2, 3
  for b in _take(pl.make_iterator(_cfg(data_dir)), 5):
    assert sorted(b) == sorted(pl.KEYS)
    assert all(v.shape == (8, T) and v.dtype == np.int32 for v in b.values())
    seg, pos, ids = b["segment_ids"], b["positions"], b["input_ids"]
    assert np.array_equal(seg == 0, ids == 0)
    for r in range(8):
      n = seg[r].max()
      assert set(np.unique(seg[r])) - {0} == set(range(1, n + 1))
      for s in range(1, n + 1):
        piece = ids[r][seg[r] == s]
        assert piece[0] == cls_id and piece[-1] == sep_id
        assert np.array_equal(pos[r][seg[r] == s], np.arange(len(piece)))
    assert (b["token_type_ids"] == 0).all()
    assert (b["word_starts"][ids == cls_id] == 1).all()


def test_same_seed_same_batches_other_seed_other_order(data_dir):
  a = _take(pl.make_iterator(_cfg(data_dir, seed=3)), 6)
  b = _take(pl.make_iterator(_cfg(data_dir, seed=3)), 6)
  c = _take(pl.make_iterator(_cfg(data_dir, seed=4)), 6)
  assert _same(a, b)
  assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def test_epochs_are_reshuffled(data_dir):
  one = _all(_cfg(data_dir, num_epochs=1, packing=False, drop_remainder=False))
  two = _all(_cfg(data_dir, num_epochs=2, packing=False, drop_remainder=False))
  first, second = _pieces(two)[:len(_pieces(one))], _pieces(two)[len(_pieces(one)):]
  assert collections.Counter(second) == collections.Counter(first)
  assert second != first


@pytest.mark.parametrize("packing,prefetch", [(True, 2), (False, 0), (True, 0)])
def test_resume_equals_uninterrupted(data_dir, packing, prefetch):
  cfg = _cfg(data_dir, packing=packing, prefetch=prefetch, num_epochs=None)
  full = _take(pl.make_iterator(cfg), 12)
  it = pl.make_iterator(cfg)
  _take(it, 5)
  state = it.get_state()
  _take(it, 3)  # the interrupted run went on a little past its last checkpoint
  fresh = pl.make_iterator(cfg)
  fresh.set_state(state)
  assert _same(_take(fresh, 7), full[5:])


def test_resume_through_orbax_checkpoint(data_dir, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  cfg = _cfg(data_dir)
  full = _take(pl.make_iterator(cfg), 6)
  it = pl.make_iterator(cfg)
  _take(it, 4)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(4, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"w": np.arange(3.0)}),
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = pl.make_iterator(cfg)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3)}),
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert np.array_equal(restored["state"]["w"], np.arange(3.0))
  assert _same(_take(fresh, 2), full[4:])


def test_processes_get_disjoint_examples_covering_the_data(data_dir):
  kw = dict(num_epochs=1, packing=False, drop_remainder=False, global_batch_size=8)
  whole = collections.Counter(_pieces(_all(_cfg(data_dir, **kw))))
  parts = [collections.Counter(_pieces(_all(_cfg(data_dir, process_index=i,
                                                 process_count=2, **kw))))
           for i in range(2)]
  assert not set(parts[0]) & set(parts[1])
  assert parts[0] + parts[1] == whole
  assert min(sum(p.values()) for p in parts) > 0.3 * sum(whole.values())


def test_every_token_appears_once_per_epoch(data_dir):
  m = records.load_manifest(data_dir)
  for packing in (True, False):
    batches = _all(_cfg(data_dir, num_epochs=1, packing=packing, drop_remainder=False))
    pieces = _pieces(batches)
    assert max(len(p) for p in pieces) <= T
    assert sum(len(p) - 2 for p in pieces) == m["num_tokens"]
    assert any(len(p) == T for p in pieces)  # long documents were split


def _attention_mask(seg):
  """What the model computes: (B, 1, T, T)."""
  return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0))[:, None]


def _toy_token_losses(batch, seed=0):
  """(B, T) cross-entropy of a one-layer attention model predicting each token."""
  rng = np.random.default_rng(seed)
  emb, pos_emb, typ = (rng.normal(size=s) for s in ((600, 16), (T, 16), (2, 16)))
  wq, wk, wv, wo = (rng.normal(size=(16, 16)) / 4 for _ in range(4))
  out = rng.normal(size=(16, 600))
  x = emb[batch["input_ids"]] + pos_emb[batch["positions"]] + typ[batch["token_type_ids"]]
  logits = np.einsum("btd,bsd->bts", x @ wq, x @ wk) / 4
  logits = np.where(_attention_mask(batch["segment_ids"])[:, 0], logits, -np.inf)
  logits = np.where(batch["segment_ids"][:, :, None] > 0, logits, 0.0)  # padded rows
  att = np.exp(logits - logits.max(-1, keepdims=True))
  h = (att / att.sum(-1, keepdims=True)) @ (x @ wv) @ wo + x
  z = h @ out
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, batch["input_ids"][..., None], -1)[..., 0]


def test_packing_keeps_documents_apart(data_dir):
  kw = dict(num_epochs=1, drop_remainder=False)
  packed = _all(_cfg(data_dir, packing=True, **kw))
  plain = _all(_cfg(data_dir, packing=False, **kw))
  assert sum(b["input_ids"].shape[0] for b in packed) < sum(
      b["input_ids"].shape[0] for b in plain)
  # The mask, from the pieces' own boundaries: a new piece starts at each [CLS].
  for b in packed:
    piece = np.cumsum(b["input_ids"] == 2, axis=1) * (b["input_ids"] > 0)
    expect = (piece[:, :, None] == piece[:, None, :]) & (piece[:, :, None] > 0)
    assert np.array_equal(_attention_mask(b["segment_ids"])[:, 0], expect)
  assert sum((b["segment_ids"] > 1).sum() for b in packed) > 0
  # Per-token losses of each piece are the same packed or alone in its row.
  def piece_losses(batches):
    out = {}
    for b in batches:
      loss = _toy_token_losses(b)
      for r, (ids, seg) in enumerate(zip(b["input_ids"], b["segment_ids"])):
        for s in range(1, seg.max() + 1):
          out.setdefault(tuple(ids[seg == s]), []).append(loss[r][seg == s])
    return out
  lp, lu = piece_losses(packed), piece_losses(plain)
  assert lp.keys() == lu.keys()
  for k in lp:
    np.testing.assert_allclose(np.stack(lp[k]), np.stack(lu[k]), rtol=1e-9, atol=1e-9)
  total = lambda d: sum(x.sum() for v in d.values() for x in v)
  np.testing.assert_allclose(total(lp), total(lu), rtol=1e-9)


def test_pair_segments(data_dir):
  b = next(pl.make_iterator(_cfg(data_dir, pair_segments=True)))
  two_part = 0
  for r in range(8):
    seg = b["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      ids, types = b["input_ids"][r][seg == s], b["token_type_ids"][r][seg == s]
      seps = np.flatnonzero(ids == 3)
      assert len(seps) in (1, 2) and seps[-1] == len(ids) - 1
      assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
      two_part += len(seps) == 2
  assert two_part > 0


def test_to_global_arrays(data_dir):
  import jax
  from jax.sharding import PartitionSpec as P
  b = next(pl.make_iterator(_cfg(data_dir)))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  g = pl.to_global_arrays(b, mesh, P("data"))
  assert g["input_ids"].shape == (8, T) and g["input_ids"].sharding.spec == P("data")
  assert np.array_equal(np.asarray(g["segment_ids"]), b["segment_ids"])


def test_bad_input(data_dir, tmp_path):
  with pytest.raises(ConfigError, match="vocab_size 600 but the model has"):
    pl.make_iterator(_cfg(data_dir, vocab_size=500))
  with pytest.raises(ConfigError, match="^train.batch_size=8 does not divide over 3 "):
    pl.make_iterator(_cfg(data_dir, process_count=3))
  with pytest.raises(ConfigError, match="^train.seq_len=3 is too short"):
    pl.make_iterator(_cfg(data_dir, seq_len=3))
  with pytest.raises(DataError, match="no manifest.json"):
    pl.make_iterator(_cfg(str(tmp_path)))
  # A truncated shard is named before anything is read.
  broken = tmp_path / "broken"
  os.system(f"cp -r {data_dir} {broken}")
  shard = sorted(broken.glob("tokens-*"))[1]
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(DataError, match=f"^corrupt or truncated shard .*{shard.name}"):
    pl.make_iterator(_cfg(str(broken)))
