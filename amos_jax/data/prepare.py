"""`amos-prepare`: raw text -> pre-tokenized ArrayRecord shards plus a manifest.

  amos-prepare --input demo --train-tokenizer --vocab-size 8000 --out data/demo
  amos-prepare --input 'corpus/*.txt' --doc-sep blank --tokenizer tok/ --out data/c
  amos-prepare --input docs.jsonl --text-field body --tokenizer vocab.txt --out data/j
  amos-prepare --input tfds:amos_text/mycorpus:train --tfds-data-dir ~/tfds ...
  amos-prepare --register-tfds mycorpus --input 'corpus/*.txt' --tfds-data-dir ~/tfds
  amos-prepare --verify data/demo

Output directory: `tokens-XXXXX-of-NNNNN.array_record` (one record per document),
`tokenizer/` (the tokenizer, so the data carries what made it) and `manifest.json`;
the format is `records.py`'s. Everything is written into a temporary sibling folder
and renamed into place at the end, so a directory with a manifest is always
complete. `--out` must be new, empty, or (with `--overwrite`) an earlier
amos-prepare output; nothing else is ever deleted.

Documents are assigned to shards round-robin in source order, so the output does
not depend on the number of worker processes.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from amos_jax import paths
from amos_jax.data import corpus
from amos_jax.data import records
from amos_jax.data import tokenizer as tk
# Re-exported for benchmarks/bench_loader.py.
from amos_jax.data.records import load_manifest  # noqa: F401
from amos_jax.errors import ConfigError, DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# --------------------------------------------------------------- tokenizing
_WORKER_TOK: tk.Tokenizer | None = None


def _init_worker(tokenizer_dir):
  global _WORKER_TOK
  _WORKER_TOK = tk.load_tokenizer(tokenizer_dir)


def encode_documents(tok: tk.Tokenizer, docs: list[str]) -> list[bytes]:
  """Each document -> one record; sentences are encoded separately to mark them."""
  sents, owner = [], []
  for d, doc in enumerate(docs):
    for s in _SENTENCE_END.split(doc):
      if s.strip():
        sents.append(s)
        owner.append(d)
  per_doc: list[list] = [[[], [], []] for _ in docs]
  for d, (ids, starts) in zip(owner, tok.encode_batch(sents)):
    if ids:
      acc = per_doc[d]
      acc[0].extend(ids)
      acc[1].extend(starts)
      acc[2].extend([True] + [False] * (len(ids) - 1))
  return [records.encode_record(*acc) for acc in per_doc if acc[0]]


def _encode_chunk(docs):
  return encode_documents(_WORKER_TOK, docs)


def _chunks(it, size):
  chunk = []
  for x in it:
    chunk.append(x)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


# --------------------------------------------------------------- output folder
def _check_out_dir(out_dir: str, overwrite: bool) -> bool:
  """Raises unless out_dir can be written as asked; True if it holds data to replace.

  Only a folder that amos-prepare wrote (our manifest, and nothing but our files)
  may be replaced, and only with --overwrite: a tool never deletes what it did not
  write.
  """
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise DataError(f"--out {out_dir} is a file; give a folder path (new or empty)")
  parent = os.path.dirname(out_dir)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise DataError(f"--out {out_dir}: {parent} is a file, not a folder; give "
                    "another --out")
  # The data is written into a sibling of out_dir and renamed: the parent must be
  # writable (the nearest existing one, when out_dir's parents are to be made).
  if not os.access(parent, os.W_OK | os.X_OK):
    raise DataError(f"--out {out_dir}: cannot write in {parent} (permission denied); "
                    "give a writable folder")
  if not os.path.isdir(out_dir):
    return False
  try:
    entries = os.listdir(out_dir)
  except OSError as e:
    raise DataError(f"--out {out_dir}: cannot list it ({e.strerror})") from None
  return _check_entries(out_dir, entries, overwrite)


def _check_entries(out_dir: str, entries: list[str], overwrite: bool) -> bool:
  """True if out_dir's `entries` are earlier prepared data we may replace; raises if
  they are not ours, or without --overwrite."""
  if not entries:
    return False
  if records.read_manifest_format(out_dir) != records.FORMAT:
    raise DataError(f"--out {out_dir} is not empty and is not amos-prepare output (no "
                    f"{records.MANIFEST} of ours); give a new or empty folder")
  foreign = sorted(e for e in entries if not records.is_own_entry(e))
  if foreign:
    raise DataError(f"--out {out_dir} holds {foreign[0]!r}, which amos-prepare did not "
                    "write; move it away or give another --out")
  if not overwrite:
    raise DataError(f"{out_dir} already holds prepared data; pass --overwrite to "
                    "replace it")
  return True


def _move_into_place(tmp: str, out_dir: str, replace: bool) -> None:
  """Renames the finished tmp folder to out_dir; the old data goes only after that."""
  if not replace:
    try:
      # Renaming onto a folder succeeds only if it is empty: nothing can be lost.
      os.rename(tmp, out_dir)
    except OSError:
      if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"--out {out_dir} was filled by something else while preparing; "
                        "nothing was written, run again with an empty --out") from None
      raise
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                         dir=os.path.dirname(out_dir))
  os.rename(out_dir, old)  # onto the empty folder mkdtemp made
  try:
    os.rename(tmp, out_dir)
  except BaseException as e:
    os.rename(old, out_dir)
    if isinstance(e, OSError):
      raise DataError(f"--out {out_dir}: cannot move the new data into place "
                      f"({e.strerror or e}); the old data is kept") from None
    raise
  shutil.rmtree(old, ignore_errors=True)


def _check_arguments(tokenizer, train_tokenizer, vocab_size, model_type, seq_len,
                     num_shards, workers, doc_sep, limit) -> None:
  if (tokenizer is None) == (not train_tokenizer):
    raise ConfigError("give exactly one of --tokenizer PATH or --train-tokenizer")
  if train_tokenizer and vocab_size <= len(tk.SPECIAL_TOKENS):
    raise ConfigError(
        f"--vocab-size {vocab_size} is too small: the {len(tk.SPECIAL_TOKENS)} special "
        "tokens alone take that many; use a few thousand (default 8000)")
  if model_type not in ("unigram", "bpe"):
    raise ConfigError(f"--model-type must be unigram or bpe, got {model_type!r}")
  if seq_len < 3:
    raise ConfigError(f"--seq-len {seq_len} is too short; use at least 3 (512 is usual)")
  if num_shards < 1:
    raise ConfigError(f"--num-shards {num_shards} must be at least 1")
  if workers < 1:
    raise ConfigError(f"--workers {workers} must be at least 1")
  if doc_sep not in ("line", "blank"):
    raise ConfigError(f"--doc-sep must be line or blank, got {doc_sep!r}")
  if limit is not None and limit < 1:
    raise ConfigError(f"--limit {limit} must be at least 1 (or left out for all documents)")


def prepare(inputs: list[str], out_dir: str, *, tokenizer: str | None = None,
            train_tokenizer: bool = False, vocab_size: int = 8000,
            model_type: str = "unigram", seq_len: int = 512, num_shards: int = 4,
            workers: int = 1, doc_sep: str = "line", text_field: str = "text",
            tfds_data_dir: str | None = None, limit: int | None = None,
            strict_utf8: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict:
  """Writes shards + manifest to out_dir (atomically); returns the manifest.

  Arguments, paths and the tokenizer are checked before the corpus is read.
  Raises ConfigError (arguments) or DataError (paths, input, output folder).
  """
  _check_arguments(tokenizer, train_tokenizer, vocab_size, model_type, seq_len,
                   num_shards, workers, doc_sep, limit)
  if not paths.is_local(out_dir):
    return _prepare_to_cloud(
        inputs, out_dir, overwrite=overwrite, tokenizer=tokenizer,
        train_tokenizer=train_tokenizer, vocab_size=vocab_size, model_type=model_type,
        seq_len=seq_len, num_shards=num_shards, workers=workers, doc_sep=doc_sep,
        text_field=text_field, tfds_data_dir=tfds_data_dir, limit=limit,
        strict_utf8=strict_utf8, progress=progress)
  out_dir = os.path.realpath(os.path.abspath(os.path.expanduser(out_dir)))
  replace = _check_out_dir(out_dir, overwrite)
  inputs = corpus.expand_inputs(inputs)
  try:
    for path in inputs:
      if os.path.isfile(path):
        corpus.check_text_file(path)
    tok = None if train_tokenizer else tk.load_tokenizer(tokenizer)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-",
                           dir=os.path.dirname(out_dir))
  except OSError as e:
    raise DataError(f"{e.filename or out_dir}: {e.strerror or e}") from None
  stats = corpus.SourceStats(strict_utf8)
  try:
    manifest = _write(tmp, inputs, tok, stats, vocab_size=vocab_size,
                      model_type=model_type, seq_len=seq_len, num_shards=num_shards,
                      workers=workers, doc_sep=doc_sep, text_field=text_field,
                      tfds_data_dir=tfds_data_dir, limit=limit, progress=progress)
    _move_into_place(tmp, out_dir, replace)
  except OSError as e:
    raise DataError(f"{e.filename or out_dir}: {e.strerror or e}") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # ours; gone already after the rename
  stats.log_warnings()
  return manifest


def _prepare_to_cloud(inputs, out_dir: str, *, overwrite: bool, **kwargs) -> dict:
  """`--out gs://...`: written locally (ArrayRecord writes local files only), then
  copied up with the manifest last, so a folder without one reads as incomplete.
  Replacing (--overwrite) deletes our old objects first: not atomic there."""
  out = paths.as_path(out_dir)
  entries = [p.name for p in out.iterdir()] if out.exists() else []
  _check_entries(out_dir, entries, overwrite)
  with tempfile.TemporaryDirectory(prefix="amos_jax-prepare-") as local:
    local_out = os.path.join(local, "data")
    manifest = prepare(inputs, local_out, **kwargs)
    (out / records.MANIFEST).unlink(missing_ok=True)
    for name in entries:
      if name != records.MANIFEST:
        old = out / name
        if old.is_dir():
          old.rmtree()
        else:
          old.unlink()
    for name in sorted(os.listdir(local_out)):
      src = os.path.join(local_out, name)
      if name == records.MANIFEST:
        continue
      if os.path.isdir(src):
        paths.copy_up(src, out / name)
      else:
        paths.copy_file(src, out / name)
    paths.copy_file(os.path.join(local_out, records.MANIFEST), out / records.MANIFEST)
  return manifest


def _write(tmp, inputs, tok, stats, *, vocab_size, model_type, seq_len, num_shards,
           workers, doc_sep, text_field, tfds_data_dir, limit, progress) -> dict:
  """Tokenizer, shards and manifest into the folder tmp; returns the manifest."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  def documents():
    it = corpus.iter_documents(inputs, doc_sep=doc_sep, text_field=text_field,
                               tfds_data_dir=tfds_data_dir, stats=stats)
    for i, doc in enumerate(it):
      if limit is not None and i >= limit:
        return
      yield doc

  docs = None
  if tok is None:
    docs = list(documents())
    if not docs:
      raise DataError(f"empty corpus: no documents in {', '.join(inputs)}")
    tok = tk.train_sentencepiece(docs, vocab_size, model_type, vocab_flag="--vocab-size")
  tok_dir = tok.save(os.path.join(tmp, records.TOKENIZER_DIR))

  names = [records.shard_name(k, num_shards) for k in range(num_shards)]
  writers = [ArrayRecordWriter(os.path.join(tmp, n), "group_size:1") for n in names]
  counts = np.zeros((num_shards, 2), np.int64)  # records, tokens
  n_docs = n_tokens = 0
  chunks = _chunks(docs if docs is not None else documents(), 64)
  pool = None
  if workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(tok_dir,))
    encoded = pool.imap(_encode_chunk, chunks)  # ordered: output is deterministic
  else:
    encoded = (encode_documents(tok, c) for c in chunks)
  bar = tqdm(unit=" docs", file=sys.stderr, disable=not progress, desc="prepare")
  start = time.perf_counter()
  try:
    for recs in encoded:
      for rec in recs:
        k = n_docs % num_shards
        writers[k].write(rec)
        counts[k] += (1, len(rec) // 4)
        n_docs += 1
        n_tokens += len(rec) // 4
      bar.update(len(recs))
      rate = n_tokens / max(time.perf_counter() - start, 1e-9)
      bar.set_postfix(tokens=n_tokens, tok_s=f"{rate:,.0f}", refresh=False)
  finally:
    bar.close()
    for w in writers:
      w.close()
    if pool is not None:
      pool.terminate()
  if n_docs == 0:
    raise DataError(f"empty corpus: no documents in {', '.join(inputs)}")

  shards = [dict(file=n, num_records=int(c[0]), num_tokens=int(c[1]),
                 bytes=os.path.getsize(os.path.join(tmp, n)),
                 sha256=records.sha256_file(os.path.join(tmp, n)))
            for n, c in zip(names, counts)]
  manifest = dict(
      format=records.FORMAT, tokenizer=dict(tok.describe(), dir=records.TOKENIZER_DIR),
      seq_len=int(seq_len), num_documents=n_docs, num_tokens=n_tokens,
      shards=shards, checksum=records.overall_checksum(tok.fingerprint, shards),
      sources=[os.path.abspath(s) if os.path.exists(s) else s for s in inputs],
      invalid_utf8_lines=sum(stats.bad_utf8.values()))
  records.write_manifest(tmp, manifest)
  return manifest


# --------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
  """Argument errors are one ConfigError line, like every other bad input."""

  def error(self, message):
    raise ConfigError(f"{message}; see amos-prepare --help")


def _parser():
  p = _Parser(
      prog="amos-prepare", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", action="append", default=[],
                 help="file, glob, 'demo', or tfds:NAME[:SPLIT] (repeatable)")
  p.add_argument("--out", help="output directory: new, empty, or an earlier output "
                 "(with --overwrite)")
  p.add_argument("--tokenizer", help="tokenizer dir, .model or vocab.txt")
  p.add_argument("--train-tokenizer", action="store_true",
                 help="train a sentencepiece model on the input")
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
  p.add_argument("--seq-len", type=int, default=512, help="recorded in the manifest")
  p.add_argument("--num-shards", type=int, default=4)
  p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
  p.add_argument("--doc-sep", choices=("line", "blank"), default="line",
                 help="text files: one document per line, or blank-line separated")
  p.add_argument("--text-field", default="text", help="JSON Lines / tfds text field")
  p.add_argument("--tfds-data-dir", default=None)
  p.add_argument("--limit", type=int, default=None, help="stop after N documents")
  p.add_argument("--strict-utf8", action="store_true",
                 help="stop on invalid UTF-8 instead of replacing bad bytes")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an earlier amos-prepare output in --out")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--verify", metavar="DIR", help="re-hash a prepared directory and exit")
  p.add_argument("--register-tfds", metavar="NAME",
                 help="register --input text as tfds dataset amos_text/NAME and exit")
  return p


def main(argv: list[str] | None = None) -> int:
  """amos-prepare; raises AmosError (amos_jax.cli.prepare_main prints it)."""
  args = _parser().parse_args(argv)
  if args.verify:
    m = records.load_manifest(args.verify, verify=True)
    print(f"ok: {m['num_documents']} documents, {m['num_tokens']} tokens, "
          f"{len(m['shards'])} shards, checksum {m['checksum'][:16]}")
    return 0
  if not args.input:
    raise ConfigError("--input is required (a file, glob, 'demo' or tfds:NAME)")
  if args.register_tfds:
    if not args.tfds_data_dir:
      raise ConfigError("--tfds-data-dir is required to register a tfds dataset")
    from amos_jax.data import tfds_builder
    name = tfds_builder.register_text_corpus(
        args.register_tfds, corpus.expand_inputs(args.input),
        data_dir=args.tfds_data_dir, doc_sep=args.doc_sep, text_field=args.text_field)
    print(f"ok: registered tfds dataset {name} under {args.tfds_data_dir}")
    return 0
  if not args.out:
    raise ConfigError("--out is required (a new or empty folder)")
  m = prepare(args.input, args.out, tokenizer=args.tokenizer,
              train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size,
              model_type=args.model_type, seq_len=args.seq_len,
              num_shards=args.num_shards, workers=args.workers, doc_sep=args.doc_sep,
              text_field=args.text_field, tfds_data_dir=args.tfds_data_dir,
              limit=args.limit, strict_utf8=args.strict_utf8,
              overwrite=args.overwrite, progress=not args.quiet)
  print(f"ok: {m['num_documents']} documents, {m['num_tokens']} tokens -> {args.out}")
  return 0


if __name__ == "__main__":
  from amos_jax.cli import prepare_main
  prepare_main()
