"""Paired/triplet data: formats, layout, determinism, resume, process sharding."""
import collections
import gzip
import json
import logging

import numpy as np
import pytest

from amos_jax.data import pairs
from amos_jax.data import tokenizer as tk
from amos_jax.errors import ConfigError, DataError

ROWS = [(f"what is item {i}", f"item {i} is a thing number {i}",
         [f"item {i + 1} is not it", f"nothing about {i}"]) for i in range(40)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  texts = [" ".join(r[:2]) + " " + " ".join(r[2]) for r in ROWS] * 5
  return tk.train_sentencepiece(texts, vocab_size=120, model_type="bpe").save(
      str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("pairs")
  with open(d / "t.jsonl", "w") as f:
    for q, p, n in ROWS:
      f.write(json.dumps({"query": q, "positive": p, "negatives": n}) + "\n")
  with open(d / "t.tsv", "w") as f:
    f.write("query\tpositive\tneg1\tneg2\n")
    for q, p, n in ROWS:
      f.write("\t".join([q, p, *n]) + "\n")
  (d / "sents.tsv").write_text("\n".join(q for q, _, _ in ROWS) + "\n")
  return d


def _cfg(path, tok_dir, **kw):
  kw = dict(dict(query_len=12, passage_len=16, num_negatives=2, global_batch_size=8,
                 process_index=0, process_count=1), **kw)
  return pairs.PairsConfig(paths=(str(path),), tokenizer=tok_dir, **kw)


def _flat(batches, key="query"):
  return [tuple(r[r > 0]) for b in batches for r in b[key]["input_ids"]]


def test_layout_and_formats_agree(files, tok_dir):
  tok = tk.load_tokenizer(tok_dir)
  bj = next(pairs.make_pairs_iterator(_cfg(files / "t.jsonl", tok_dir)))
  bt = next(pairs.make_pairs_iterator(_cfg(files / "t.tsv", tok_dir)))
  for key, shape in (("query", (8, 12)), ("positive", (8, 16)), ("negatives", (8, 2, 16))):
    for k in ("input_ids", "segment_ids", "positions", "token_type_ids"):
      assert bj[key][k].shape == shape and bj[key][k].dtype == np.int32
      assert np.array_equal(bj[key][k], bt[key][k])
  ids, seg, pos = (bj["query"][k] for k in ("input_ids", "segment_ids", "positions"))
  assert (ids[:, 0] == tok.cls_id).all()
  assert np.array_equal(seg, (ids > 0).astype(np.int32))
  assert np.array_equal(pos, np.where(seg > 0, np.arange(12), 0))
  # Each row's positive and negatives belong to its query.
  for r in range(8):
    q = tok.decode(ids[r])
    i = int(q.split()[-1])
    assert tok.decode(bj["positive"]["input_ids"][r]).startswith(f"item {i} is")
    assert tok.decode(bj["negatives"]["input_ids"][r, 1]) == f"nothing about {i}"


def test_truncation_keeps_sep(files, tok_dir):
  b = next(pairs.make_pairs_iterator(_cfg(files / "t.jsonl", tok_dir, passage_len=5)))
  assert (b["positive"]["input_ids"][:, -1] == 3).all()


def test_seed_resume_and_process_shards(files, tok_dir):
  cfg = _cfg(files / "t.jsonl", tok_dir, seed=1)
  it = pairs.make_pairs_iterator(cfg)
  full = [next(it) for _ in range(8)]  # 64 rows: crosses into the second epoch
  again = pairs.make_pairs_iterator(cfg)
  assert _flat([next(again) for _ in range(8)]) == _flat(full)
  other = pairs.make_pairs_iterator(_cfg(files / "t.jsonl", tok_dir, seed=2))
  assert _flat([next(other)]) != _flat(full[:1])
  it = pairs.make_pairs_iterator(cfg)
  [next(it) for _ in range(3)]
  state = it.get_state()
  fresh = pairs.make_pairs_iterator(cfg)
  fresh.set_state(state)
  assert _flat([next(fresh) for _ in range(5)]) == _flat(full[3:])
  kw = dict(num_epochs=1, drop_remainder=False, process_count=2)
  parts = [collections.Counter(_flat(pairs.make_pairs_iterator(
      _cfg(files / "t.jsonl", tok_dir, process_index=i, **kw)))) for i in range(2)]
  assert not set(parts[0]) & set(parts[1])
  assert sum((parts[0] + parts[1]).values()) == len(ROWS) == len(parts[0] + parts[1])


def test_sentences_only_and_negative_counts(files, tok_dir, caplog):
  b = next(pairs.make_pairs_iterator(_cfg(files / "sents.tsv", tok_dir, num_negatives=0)))
  assert set(b) == {"query"}
  b = next(pairs.make_pairs_iterator(_cfg(files / "t.tsv", tok_dir, num_negatives=0)))
  assert set(b) == {"query", "positive"}
  with caplog.at_level(logging.WARNING, logger="amos_jax"):
    with pytest.raises(DataError, match="^no examples in .*: each has fewer than "
                       "num_negatives=3 negatives; lower it"):
      pairs.read_examples(_cfg(files / "t.jsonl", tok_dir, num_negatives=3))
  assert "skipped 40 example(s) with fewer than num_negatives=3" in caplog.text


def test_bad_input(tmp_path, tok_dir):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"query": "a", "positive": "b"}\n{not json\n')
  with pytest.raises(DataError, match=f"^{bad}:2: not JSON"):
    pairs.read_examples(_cfg(bad, tok_dir, num_negatives=0))
  mixed = tmp_path / "mixed.tsv"
  mixed.write_text("a\tb\nc\n")
  with pytest.raises(DataError, match="^some examples have a positive"):
    pairs.read_examples(_cfg(mixed, tok_dir, num_negatives=0))
  with pytest.raises(DataError, match="^pairs file .*none.tsv: no such file"):
    pairs.read_examples(_cfg(tmp_path / "none.tsv", tok_dir))
  with pytest.raises(DataError, match=f"^pairs file {tmp_path} is a folder"):
    pairs.read_examples(_cfg(tmp_path, tok_dir))
  packed = tmp_path / "pairs.tsv.gz"
  packed.write_bytes(gzip.compress(b"a\tb\n"))
  with pytest.raises(DataError, match=f"^{packed} is not UTF-8 text: it is gzip"):
    pairs.read_examples(_cfg(packed, tok_dir, num_negatives=0))
  with pytest.raises(ConfigError, match="^batch size 8 does not divide over 3"):
    pairs.make_pairs_iterator(_cfg(mixed, tok_dir, process_count=3))
