"""amos-prepare: sources, records, manifest, determinism and bad input."""
import gzip
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from amos_jax import cli
from amos_jax.data import prepare
from amos_jax.data import records
from amos_jax.data import tokenizer as tk
from amos_jax.errors import ConfigError, DataError

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
  m = records.load_manifest(out)
  recs = []
  for path in records.shard_paths(m):
    r = ArrayRecordReader(path)
    recs.append([records.decode_record(x) for x in r.read_all()])
    r.close()
  # Round-robin assignment: document i is record i // n of shard i % n.
  n = len(recs)
  return [recs[i % n][i // n] for i in range(sum(map(len, recs)))]


def _run(argv, capsys):
  """amos-prepare as the command runs it: (exit status, captured output)."""
  with pytest.raises(SystemExit) as exit_:
    cli.prepare_main(argv + ["--quiet"])
  return exit_.value.code, capsys.readouterr()


def _one_error_line(code, out, msg):
  """Exit status 2 and exactly one `error:` line holding msg on stderr."""
  assert code == 2, out
  assert out.err.count("\n") == 1 and out.err.startswith("error: "), out.err
  assert msg in out.err, out.err


def test_record_format_round_trip():
  ids = [5, 0, (1 << 30) - 1, 17]
  rec = records.encode_record(ids, [1, 0, 1, 0], [1, 0, 0, 1])
  got_ids, words, sents = records.decode_record(rec)
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
  m = records.load_manifest(str(tmp_path / "a"))
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
  assert records.load_manifest(str(tmp_path / "j"))["num_documents"] == 2 * len(TEXT)
  code, err = _run(["--input", str(tmp_path / "part0.jsonl"), "--tokenizer", tok_dir,
                    "--out", str(tmp_path / "j2")], capsys)
  _one_error_line(code, err, "no field 'text'")


def test_invalid_utf8_is_replaced_and_reported(tmp_path, tok_dir, capsys, caplog):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"good line\nbad \xff\xfe bytes here\nanother good one\n")
  with caplog.at_level(logging.WARNING, logger="amos_jax"):
    code, out = _run(["--input", str(bad), "--tokenizer", tok_dir, "--out",
                      str(tmp_path / "u")], capsys)
  assert code == 0
  assert "1 line(s) had invalid UTF-8" in caplog.text and str(bad) in caplog.text
  m = records.load_manifest(str(tmp_path / "u"))
  assert m["num_documents"] == 3 and m["invalid_utf8_lines"] == 1
  code, out = _run(["--input", str(bad), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / "u2"), "--strict-utf8"], capsys)
  _one_error_line(code, out, "invalid UTF-8")
  assert not (tmp_path / "u2").exists()


def test_binary_input_is_refused(tmp_path, tok_dir, capsys):
  rng = np.random.default_rng(0)
  noise = tmp_path / "noise.bin"
  noise.write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
  packed = tmp_path / "docs.txt.gz"
  packed.write_bytes(gzip.compress(("\n".join(TEXT) + "\n").encode()))
  utf16 = tmp_path / "docs16.txt"
  utf16.write_bytes(("\n".join(TEXT) + "\n").encode("utf-16"))
  for path, msg in ((noise, "is not UTF-8 text"), (packed, "gzip-compressed"),
                    (utf16, "UTF-16")):
    for extra in ([], ["--train-tokenizer"]):
      argv = ["--input", str(path), "--out", str(tmp_path / "o")]
      code, out = _run(argv + (extra or ["--tokenizer", tok_dir]), capsys)
      _one_error_line(code, out, msg)
      assert str(path) in out.err
  assert not (tmp_path / "o").exists()


def test_compressed_input_is_refused_before_any_is_read(tmp_path, tok_dir, monkeypatch):
  from amos_jax.data import corpus
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  packed = tmp_path / "more.txt.gz"
  packed.write_bytes(gzip.compress(b"more text\n"))

  def read(*args, **kwargs):
    raise AssertionError("the corpus was read before the inputs were checked")

  monkeypatch.setattr(corpus, "iter_documents", read)
  with pytest.raises(DataError, match=f"^{packed} is not UTF-8 text: it is gzip"):
    prepare.prepare([str(src), str(packed)], str(tmp_path / "o"), tokenizer=tok_dir,
                    progress=False)


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
    _one_error_line(code, out, msg)
  # Nothing half-written is left behind, under the final name or a temporary one.
  assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def test_exit_code_and_no_traceback_from_the_command(tmp_path):
  for launch in (["-c", "from amos_jax.cli import prepare_main; prepare_main()"],
                 ["-m", "amos_jax.data.prepare"]):
    proc = subprocess.run(
        [sys.executable, *launch, "--input", str(tmp_path / "x"), "--train-tokenizer",
         "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --input") and proc.stderr.count("\n") == 1


def test_deterministic_across_workers_and_refuses_to_overwrite(tmp_path, tok_dir, capsys):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(f"{t} Number {i}." for i in range(60) for t in TEXT) + "\n")
  sums = []
  for name, workers in (("w1", "1"), ("w2", "2")):
    code, _ = _run(["--input", str(src), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / name), "--workers", workers], capsys)
    assert code == 0
    sums.append(records.load_manifest(str(tmp_path / name))["checksum"])
  assert sums[0] == sums[1]
  code, out = _run(["--input", str(src), "--tokenizer", tok_dir, "--out",
                    str(tmp_path / "w1")], capsys)
  _one_error_line(code, out, "--overwrite")


def test_corrupt_shard_is_named(tmp_path, tok_dir, capsys):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT * 20) + "\n")
  out = str(tmp_path / "c")
  assert _run(["--input", str(src), "--tokenizer", tok_dir, "--out", out], capsys)[0] == 0
  assert _run(["--verify", out], capsys)[0] == 0
  shard = os.path.join(out, records.shard_name(2, 4))
  data = bytearray(open(shard, "rb").read())
  data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
  open(shard, "wb").write(bytes(data))
  code, res = _run(["--verify", out], capsys)
  _one_error_line(code, res, "sha256")
  assert shard in res.err


def test_tokenizer_mismatch(tmp_path, tok_dir, capsys):
  from amos_jax.data import corpus
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  out = str(tmp_path / "d")
  assert _run(["--input", str(src), "--tokenizer", tok_dir, "--out", out], capsys)[0] == 0
  m = records.load_manifest(out)
  records.check_vocab(m, 800, tk.load_tokenizer(tok_dir))
  other = tk.train_sentencepiece(corpus.demo_documents()[-60:], 800, "bpe")
  with pytest.raises(DataError, match="^data in .* different tokenizer"):
    records.check_vocab(m, 800, other)
  with pytest.raises(ConfigError, match="model.vocab_size=500"):
    records.check_vocab(m, 500)


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
  assert code == 0 and records.load_manifest(str(tmp_path / "demo"))["num_documents"] == 5


# ------------------------------------------------- the output folder and arguments
def _siblings(path):
  """Temporary folders amos-prepare would leave next to `path` if it failed badly."""
  return [n for n in os.listdir(os.path.dirname(path))
          if n.startswith(f".{os.path.basename(path)}.")]


def test_out_folder_that_is_not_ours_is_never_deleted(tmp_path, tok_dir, capsys):
  """A non-empty folder without our manifest (here: the corpus itself, or another
  tool's manifest.json) is refused with or without --overwrite, and keeps every file."""
  folder = tmp_path / "corpus"
  folder.mkdir()
  (folder / "docs.txt").write_text("\n".join(TEXT) + "\n")
  other = tmp_path / "other"
  other.mkdir()
  (other / "manifest.json").write_text('{"format": "someone.else.v3"}')
  (other / "weights.bin").write_bytes(b"\x00" * 64)
  for out in (folder, other):
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--overwrite"]):
      code, res = _run(["--input", str(folder / "docs.txt"), "--tokenizer", tok_dir,
                        "--out", str(out)] + extra, capsys)
      _one_error_line(code, res, "is not empty and is not amos-prepare output")
      assert {p.name: p.read_bytes() for p in out.iterdir()} == before
      assert not _siblings(str(out))


def test_empty_out_folder_is_filled(tmp_path, tok_dir, capsys):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  (tmp_path / "empty").mkdir()
  code, _ = _run(["--input", str(src), "--tokenizer", tok_dir, "--out",
                  str(tmp_path / "empty")], capsys)
  assert code == 0 and records.load_manifest(str(tmp_path / "empty"))["num_documents"] == 4


def test_overwrite_replaces_only_prepared_output(tmp_path, tok_dir, capsys, monkeypatch):
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  new = tmp_path / "new.txt"
  new.write_text("\n".join(TEXT[:2]) + "\n")
  out = str(tmp_path / "out")
  assert _run(["--input", str(src), "--tokenizer", tok_dir, "--out", out], capsys)[0] == 0
  old = records.load_manifest(out)["checksum"]
  argv = ["--input", str(new), "--tokenizer", tok_dir, "--out", out, "--overwrite"]
  # A file amos-prepare did not write stops --overwrite, which names it.
  (tmp_path / "out" / "notes.txt").write_text("mine")
  _one_error_line(*_run(argv, capsys), "holds 'notes.txt', which amos-prepare did not")
  assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
  (tmp_path / "out" / "notes.txt").unlink()
  # A failure while the new data is written leaves the old data as it was.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{oops\n')
  code, res = _run(["--input", str(bad)] + argv[2:], capsys)
  _one_error_line(code, res, "not JSON")
  assert records.load_manifest(out, verify=True)["checksum"] == old
  # So does a failure of the final rename: the old folder is put back.
  rename = os.rename

  def failing_rename(src_path, dst_path):
    if ".tmp-" in os.path.basename(src_path):
      raise OSError(5, "Input/output error", src_path)
    return rename(src_path, dst_path)

  monkeypatch.setattr(os, "rename", failing_rename)
  _one_error_line(*_run(argv, capsys), "the old data is kept")
  monkeypatch.undo()
  assert records.load_manifest(out, verify=True)["checksum"] == old
  # And with nothing in the way, --overwrite replaces it.
  assert _run(argv, capsys)[0] == 0
  m = records.load_manifest(out, verify=True)
  assert m["checksum"] != old and m["num_documents"] == 2
  assert not _siblings(out)


def test_out_path_problems_come_before_the_corpus(tmp_path, capsys, monkeypatch):
  """--out is checked first: the input here is binary and would fail if read."""
  noise = tmp_path / "noise.bin"
  noise.write_bytes(bytes(range(256)) * 40)
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  (tmp_path / "locked").mkdir()
  cases = [(a_file, f"--out {a_file} is a file"),
           (a_file / "sub" / "data", f"{a_file} is a file, not a folder"),
           (tmp_path / "locked" / "data", f"cannot write in {tmp_path / 'locked'}")]
  access = os.access
  # Tests run as root here, where chmod cannot make a folder unwritable.
  monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not str(
      path).endswith("locked"))
  for out, msg in cases:
    code, res = _run(["--input", str(noise), "--train-tokenizer", "--out", str(out)],
                     capsys)
    _one_error_line(code, res, msg)
  assert sorted(os.listdir(tmp_path)) == ["file.txt", "locked", "noise.bin"]
  assert a_file.read_text() == "x" and not os.listdir(tmp_path / "locked")


def test_input_folder_says_what_to_give(tmp_path, tok_dir, capsys):
  folder = tmp_path / "texts"
  folder.mkdir()
  (folder / "a.txt").write_text("\n".join(TEXT) + "\n")
  argv = ["--tokenizer", tok_dir, "--out", str(tmp_path / "o")]
  code, res = _run(["--input", str(folder)] + argv, capsys)
  _one_error_line(code, res, f"--input {folder} is a folder; give a file or a glob like "
                  f"{folder}/*.txt")
  assert _run(["--input", str(folder / "*.txt")] + argv, capsys)[0] == 0


def test_impossible_arguments_are_one_line(tmp_path, tok_dir, capsys):
  """Argument errors come first: the input does not even exist."""
  argv = ["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]
  cases = [
      (["--train-tokenizer", "--vocab-size", "0"], "--vocab-size 0 is too small"),
      (["--train-tokenizer", "--vocab-size", "-3"], "--vocab-size -3 is too small"),
      (["--tokenizer", tok_dir, "--num-shards", "0"], "--num-shards 0 must be at least 1"),
      (["--tokenizer", tok_dir, "--seq-len", "2"], "--seq-len 2 is too short"),
      (["--tokenizer", tok_dir, "--workers", "0"], "--workers 0 must be at least 1"),
      (["--tokenizer", tok_dir, "--limit", "0"], "--limit 0 must be at least 1"),
      (["--tokenizer", tok_dir, "--vocab-size", "many"], "invalid int value: 'many'"),
      (["--tokenizer", tok_dir, "--train-tokenizer"], "exactly one of --tokenizer"),
  ]
  for extra, msg in cases:
    code, res = _run(argv + extra, capsys)
    _one_error_line(code, res, msg)
    assert "lower" not in res.err
  assert sorted(os.listdir(tmp_path)) == []


def test_vocab_size_advice_points_the_right_way(tmp_path, capsys):
  small = tmp_path / "small.txt"
  small.write_text("hello world this is text\nanother line of words here\n")
  argv = ["--input", str(small), "--train-tokenizer", "--out", str(tmp_path / "o")]
  code, res = _run(argv + ["--vocab-size", "8"], capsys)
  _one_error_line(code, res, "--vocab-size=8 is smaller than the corpus's characters "
                  "need; raise it to at least")
  code, res = _run(argv + ["--vocab-size", "9000"], capsys)
  _one_error_line(code, res, "--vocab-size=9000 is too large for this corpus; lower it "
                  "to at most")


def test_unreadable_tokenizer_file_is_a_data_error(tmp_path, tok_dir):
  broken = tmp_path / "tok"
  tk.load_tokenizer(tok_dir).save(str(broken))
  os.remove(broken / "spm.model")
  src = tmp_path / "docs.txt"
  src.write_text("\n".join(TEXT) + "\n")
  with pytest.raises(DataError, match=f"^{broken / 'spm.model'}: No such file"):
    prepare.prepare([str(src)], str(tmp_path / "o"), tokenizer=str(broken),
                    progress=False)
  assert sorted(os.listdir(tmp_path)) == ["docs.txt", "tok"]
