"""The in-memory corpus path (`data.corpus`): reading, bad input, rows, batches."""
import gzip
import logging

import numpy as np
import pytest

from amos_jax.data import sequences
from amos_jax.data import tokenizer as tk
from amos_jax.errors import DataError

WORDS = ["the", "river", "floods", "every", "spring", "farmers", "plant", "after",
         "water", "recedes", "."]
LINES = ["The river floods every spring.", "Farmers plant after the water recedes.",
         "The water recedes after every spring."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  vocab.write_text("\n".join(list(tk.SPECIAL_TOKENS) + WORDS) + "\n")
  return tk.load_tokenizer(str(vocab))


def test_text_files_and_globs(tmp_path):
  (tmp_path / "a.txt").write_text(LINES[0] + "\n\n  " + LINES[1] + "  \n")
  (tmp_path / "b.txt").write_text(LINES[2] + "\n")
  assert sequences.load_documents(str(tmp_path / "*.txt")) == LINES
  spec = f"{tmp_path / 'b.txt'}, {tmp_path / 'a.txt'}"
  assert sequences.load_documents(spec) == [LINES[2]] + LINES[:2]


def test_missing_files_and_folders_are_one_line(tmp_path):
  (tmp_path / "sub").mkdir()
  with pytest.raises(DataError, match=f"^data.corpus {tmp_path / 'none.txt'}: no such "
                     "file; give a text file .*'demo'$"):
    sequences.load_documents(str(tmp_path / "none.txt"))
  # A folder was a traceback (IsADirectoryError) before.
  with pytest.raises(DataError, match=f"^data.corpus {tmp_path} is a folder; give a "
                     f"file or a glob like {tmp_path}/\\*.txt$"):
    sequences.load_documents(str(tmp_path))
  with pytest.raises(DataError, match="matches only folders"):
    sequences.load_documents(str(tmp_path / "s*"))
  (tmp_path / "blank.txt").write_text("\n   \n")
  with pytest.raises(DataError, match="holds no text"):
    sequences.load_documents(str(tmp_path / "blank.txt"))


def test_invalid_utf8_lines_are_counted_and_logged(tmp_path, caplog):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"good line\nbad \xff\xfe bytes\nanother good one\nlast\n")
  with caplog.at_level(logging.WARNING, logger="amos_jax"):
    docs = sequences.load_documents(str(bad))
  assert docs[1] == "bad \ufffd\ufffd bytes" and len(docs) == 4
  assert [r.name for r in caplog.records] == ["amos_jax"]
  assert f"{bad}: 1 line(s) had invalid UTF-8" in caplog.text


@pytest.mark.parametrize("kind", ["random", "gzip", "utf16", "utf16le_no_bom",
                                  "mostly_bad_lines", "mostly_bad_bytes"])
def test_binary_or_mostly_undecodable_corpus_is_refused(tmp_path, kind):
  rng = np.random.default_rng(0)
  text = ("\n".join(LINES) + "\n").encode()
  data = {
      "random": rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
      "gzip": gzip.compress(text * 20),
      "utf16": ("\n".join(LINES) + "\n").encode("utf-16"),
      # Valid UTF-8, but NUL bytes are never text.
      "utf16le_no_bom": ("\n".join(LINES) + "\n").encode("utf-16-le"),
      # Most lines are bad, though most bytes are good.
      "mostly_bad_lines": text * 3 + b"\xff\n" * 10,
      # Few bad lines, but one of them is most of the file.
      "mostly_bad_bytes": text * 3 + b"\x80" * 2000 + b"\n",
  }[kind]
  path = tmp_path / "corpus.txt"
  path.write_bytes(data)
  with pytest.raises(DataError, match=f"^{path} is not UTF-8 text") as e:
    sequences.load_documents(str(path))
  assert "\n" not in str(e.value)


def test_rows_and_which_split_is_too_short(tok):
  rows, starts = sequences.make_rows(tok, LINES * 4, seq_len=8)
  assert rows.shape == starts.shape and rows.shape[1] == 8
  assert (rows[:, 0] == tok.cls_id).all() and (rows[:, -1] == tok.sep_id).all()
  assert starts[:, 1:-1].all()  # every vocabulary entry is a whole word
  with pytest.raises(DataError, match="^the corpus \\(training split\\) has 6 tokens, "
                     "fewer than one sequence of train.seq_len=16; .*data.corpus"):
    sequences.make_rows(tok, LINES[:1], seq_len=16)
  # The held-out split was blamed on the corpus before.
  with pytest.raises(DataError, match="^the held-out split \\(data.eval_fraction\\) has "
                     "6 tokens, fewer than one sequence of train.seq_len=16; raise "
                     "data.eval_fraction"):
    sequences.make_rows(tok, LINES[:1], seq_len=16, split="eval")


def test_batches_are_a_function_of_the_step(tok):
  rows, starts = sequences.make_rows(tok, LINES * 8, seq_len=6)
  b = sequences.SequenceBatches(rows, starts, global_batch=4, seed=1)
  again = sequences.SequenceBatches(rows, starts, global_batch=4, seed=1)
  assert all(np.array_equal(b.batch(s)["input_ids"], again.batch(s)["input_ids"])
             for s in range(5))
  halves = [sequences.SequenceBatches(rows, starts, 4, 1, process_index=i,
                                      process_count=2).batch(3)["input_ids"]
            for i in range(2)]
  assert np.array_equal(np.concatenate(halves), b.batch(3)["input_ids"])
