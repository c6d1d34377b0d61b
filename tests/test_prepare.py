"""amos-prepare: sources, records, manifest, determinism and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from amos_jax.data import prepare
from amos_jax.data import tokenizer as tk

TEXT = [
    "The river floods every spring. Farmers plant after the water recedes.",
    "Sydney hosted the games in 2000.",
    "A third document, with several sentences. It has three. Yes.",
    "Short one.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  from amos_jax.data import corpus
  tok = tk.train_sentencepiece(corpus.demo_documents()[-120:], vocab_size=800,
                               model_type="bpe")
  return tok.save(str(tmp_path_factory.mktemp("tok")))


def _records(out):
  from array_record.python.array_record_module import ArrayRecordReader
  m = prepare.load_manifest(out)
  recs = []
  for path in prepare.shard_paths(m):
    r = ArrayRecordReader(path)
    recs.append([prepare.decode_record(x) for x in r.read_all()])
    r.close()
  # Round-robin assignment: document i is record i // n of shard i % n.
  n = len(recs)
  return [recs[i % n][i // n] for i in range(sum(map(len, recs)))]


def _run(argv, capsys):
  code = prepare.main(argv + ["--quiet"])
  return code, capsys.readouterr()


def test_record_format_round_trip():
  ids = [5, 0, (1 << 30) - 1, 17]
  rec = prepare.encode_record(ids, [1, 0, 1, 0], [1, 0, 0, 1])
  got_ids, words, sents = prepare.decode_record(rec)
  assert got_ids.tolist() == ids and got_ids.dtype == np.int32
  assert words.tolist() == [True, False, True, False]
  assert sents.tolist() == [True, False, False, True]


def test_text_lines_and_blank_separated(tmp_path, tok_dir, capsys):
  tok = tk.load_tokenizer(tok_dir)
  lines = tmp_path / "lines.txt"
  lines.write_text("\n".join(TEXT) + "\n\n")
  code, _ = _run(["--input", str(lines), "--tokenizer", tok_dir, "--out",
                  str(tmp_path / "a"), "--num-shards", "3"], capsys)
  assert code == 0
  m = prepare.load_manifest(str(tmp_path / "a"))
  recs = _records(str(tmp_path / "a"))
  assert m["num_documents"] == len(TEXT) == len(recs)
  assert m["num_tokens"] == sum(len(r[0]) for r in recs)
  assert m["tokenizer"]["fingerprint"] == tok.fingerprint
  for text, (ids, words, sents) in zip(TEXT, recs):
    assert tok.decode(ids) == tok.normalize(text)
    assert words[0] and sents[0]
    # One sentence-start flag per sentence of the document.
    assert sents.sum() == len(prepare._SENTENCE_END.split(text))
  blank = tmp_path / "blank.txt"
  blank.write_text("first para\nstill first\n\nsecond para\n\n\nthird\n")
  code, _ = _run(["--input", str(blank), "--doc-sep", "blank", "--tokenizer", tok_dir,
                  "--out", str(tmp_path / "b")], capsys)
  recs = _records(str(tmp_path / "b"))
  assert code == 0 and len(recs) == 3
  assert tok.decode(recs[0][0]) == "first para still first"


def test_jsonl_and_globs(tmp_path, tok_dir, capsys):
  for i in range(2):
    with open(tmp_path / f"part{i}.jsonl", "w") as f:
      for t in TEXT:
        f.write(json.dumps({"id": i, "body": t}) + "\n")
  code, _ = _run(["--input", str(tmp_path / "part*.jsonl"), "--text-field", "body",
                  "--tokenizer", tok_dir, "--out", str(tmp_path / "j")], capsys)
  assert code == 0
  assert prepare.load_manifest(str(tmp_path / "j"))["num_documents"] == 2 * len(TEXT)
  code, err = _run(["--input", str(tmp_path / "part0.jsonl"), "--tokenizer", tok_dir,
                    "--out", str(tmp_path / "j2")], capsys)
  assert code == 2 and "no field 'text'" in err.err


def test_invalid_utf8_is_replaced_and_reported(tmp_path, tok_dir, capsys):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"good line\nbad \xff\xfe bytes here\nanother good one\n")
  code, out = _run(["--input", str(bad), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / "u")], capsys)
  assert code == 0
  assert "1 line(s) had invalid UTF-8" in out.err and str(bad) in out.err
  m = prepare.load_manifest(str(tmp_path / "u"))
  assert m["num_documents"] == 3 and m["invalid_utf8_lines"] == 1
  code, out = _run(["--input", str(bad), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / "u2"), "--strict-utf8"], capsys)
  assert code == 2 and out.err.startswith("error:") and "invalid UTF-8" in out.err
  assert not (tmp_path / "u2").exists()


def test_bad_input_gives_one_error_line(tmp_path, tok_dir, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  cases = [
      (["--input", str(tmp_path / "nope.txt"), "--tokenizer", tok_dir], "no such file"),
      (["--input", str(empty), "--tokenizer", tok_dir], "empty corpus"),
      (["--input", str(empty), "--train-tokenizer"], "empty corpus"),
      (["--input", str(empty), "--tokenizer", str(tmp_path / "none")], "tokenizer not found"),
      (["--input", "tfds:no_such_dataset", "--tokenizer", tok_dir], "cannot open tfds"),
  ]
  for argv, msg in cases:
    code, out = _run(argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2, argv
    assert out.err.count("\n") == 1 and out.err.startswith("error:") and msg in out.err
  # Nothing half-written is left behind, under the final name or a temporary one.
  assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def test_exit_code_and_no_traceback_from_the_command(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "amos_jax.data.prepare", "--input", str(tmp_path / "x"),
       "--train-tokenizer", "--out", str(tmp_path / "o")], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_deterministic_across_workers_and_refuses_to_overwrite(tmp_path, tok_dir, capsys):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(f"{t} Number {i}." for i in range(60) for t in TEXT) + "\n")
  sums = []
  for name, workers in (("w1", "1"), ("w2", "2")):
    code, _ = _run(["--input", str(src), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / name), "--workers", workers], capsys)
    assert code == 0
    sums.append(prepare.load_manifest(str(tmp_path / name))["checksum"])
  assert sums[0] == sums[1]
  code, out = _run(["--input", str(src), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / "w1")], capsys)
  assert code == 2 and "--overwrite" in out.err


def test_corrupt_shard_is_named(tmp_path, tok_dir, capsys):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT * 20) + "\n")
  out = str(tmp_path / "c")
  assert _run(["--input", str(src), "--tokenizer", tok_dir, "--out", out], capsys)[0] == 0
  assert _run(["--verify", out], capsys)[0] == 0
  shard = os.path.join(out, prepare.shard_name(2, 4))
  data = bytearray(open(shard, "rb").read())
  data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
  open(shard, "wb").write(bytes(data))
  code, res = _run(["--verify", out], capsys)
  assert code == 2 and shard in res.err and "sha256" in res.err


def test_tokenizer_mismatch(tmp_path, tok_dir, capsys):
  from amos_jax.data import corpus
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  out = str(tmp_path / "d")
  assert _run(["--input", str(src), "--tokenizer", tok_dir, "--out", out], capsys)[0] == 0
  m = prepare.load_manifest(out)
  prepare.check_vocab(m, 800, tk.load_tokenizer(tok_dir))
  other = tk.train_sentencepiece(corpus.demo_documents()[-60:], 800, "bpe")
  with pytest.raises(SystemExit, match="different tokenizer"):
    prepare.check_vocab(m, 800, other)
  with pytest.raises(SystemExit, match="model.vocab_size=500"):
    prepare.check_vocab(m, 500)


def test_demo_source_and_tfds_round_trip(tmp_path, tok_dir, capsys):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  tfds_dir = str(tmp_path / "tfds")
  code, _ = _run(["--register-tfds", "tiny", "--input", str(src),
                  "--tfds-data-dir", tfds_dir], capsys)
  assert code == 0
  code, _ = _run(["--input", "tfds:amos_text/tiny:train", "--tfds-data-dir", tfds_dir,
                  "--tokenizer", tok_dir, "--out", str(tmp_path / "t")], capsys)
  assert code == 0
  code, _ = _run(["--input", str(src), "--tokenizer", tok_dir, "--out",
                  str(tmp_path / "plain")], capsys)
  a = {tuple(r[0]) for r in _records(str(tmp_path / "t"))}
  b = {tuple(r[0]) for r in _records(str(tmp_path / "plain"))}
  assert a == b and len(a) == len(TEXT)
  code, _ = _run(["--input", "demo", "--limit", "5", "--tokenizer", tok_dir, "--out",
                  str(tmp_path / "demo")], capsys)
  assert code == 0 and prepare.load_manifest(str(tmp_path / "demo"))["num_documents"] == 5
