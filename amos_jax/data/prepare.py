"""`amos-prepare`: raw text -> pre-tokenized ArrayRecord shards plus a manifest.

  amos-prepare --input demo --train-tokenizer --vocab-size 8000 --out data/demo
  amos-prepare --input 'corpus/*.txt' --doc-sep blank --tokenizer tok/ --out data/c
  amos-prepare --input docs.jsonl --text-field body --tokenizer vocab.txt --out data/j
  amos-prepare --input tfds:amos_text/mycorpus:train --tfds-data-dir ~/tfds ...
  amos-prepare --register-tfds mycorpus --input 'corpus/*.txt' --tfds-data-dir ~/tfds
  amos-prepare --verify data/demo

Output directory: `tokens-XXXXX-of-NNNNN.array_record` (one record per document),
`tokenizer/` (the tokenizer, so the data carries what made it) and `manifest.json`
(tokenizer description, counts, sequence length, per-shard and overall sha256).
Everything is written under a temporary name and renamed into place at the end,
so a directory with a manifest is always complete.

Record format: little-endian uint32 per token; bits 0-29 the token id, bit 30 set
where a sentence starts (for sentence-pair segments), bit 31 where a word starts
(for whole-word masking). Documents are assigned to shards round-robin in source
order, so the output does not depend on the number of worker processes.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Iterable, Iterator

import numpy as np

from amos_jax.data import tokenizer as tk

FORMAT = "amos_jax.tokens.v1"
MANIFEST = "manifest.json"
_ID_MASK = (1 << 30) - 1
_SENT_BIT = np.uint32(1 << 30)
_WORD_BIT = np.uint32(1 << 31)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------ records
def encode_record(ids, word_starts, sentence_starts=None) -> bytes:
  """(n,) ids + flags -> bytes of n little-endian uint32."""
  v = np.asarray(ids, np.uint32)
  v |= np.asarray(word_starts, bool).astype(np.uint32) << 31
  if sentence_starts is not None:
    v |= np.asarray(sentence_starts, bool).astype(np.uint32) << 30
  return v.astype("<u4").tobytes()


def decode_record(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """bytes -> (ids int32 (n,), word_starts bool (n,), sentence_starts bool (n,))."""
  v = np.frombuffer(data, "<u4")
  return ((v & _ID_MASK).astype(np.int32), (v & _WORD_BIT) != 0, (v & _SENT_BIT) != 0)


# ------------------------------------------------------------------ sources
class SourceStats:
  """Counts of bad input, reported once at the end instead of per line."""

  def __init__(self, strict_utf8: bool = False):
    self.strict_utf8 = strict_utf8
    self.bad_utf8: dict[str, int] = {}

  def decode(self, raw: bytes, where: str) -> str:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      if self.strict_utf8:
        raise SystemExit(f"error: {where}: invalid UTF-8 ({e.reason} at byte "
                         f"{e.start}); fix the file or drop --strict-utf8") from None
      self.bad_utf8[where] = self.bad_utf8.get(where, 0) + 1
      return raw.decode("utf-8", errors="replace")

  def warnings(self) -> list[str]:
    return [f"warning: {f}: {n} line(s) had invalid UTF-8; bad bytes replaced with U+FFFD"
            for f, n in self.bad_utf8.items()]


def expand_inputs(patterns: Iterable[str]) -> list[str]:
  """Globs -> sorted existing paths; `demo` and `tfds:` specs pass through."""
  out = []
  for pat in patterns:
    if pat == "demo" or pat.startswith("tfds:"):
      out.append(pat)
      continue
    pat = os.path.expanduser(pat)
    matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise SystemExit(f"error: --input {pat}: no such file")
    out.extend(matches)
  return out


def _text_documents(path, doc_sep, stats):
  with open(path, "rb") as f:
    if doc_sep == "line":
      for raw in f:
        text = stats.decode(raw, path).strip()
        if text:
          yield text
      return
    para = []
    for raw in f:
      line = stats.decode(raw, path).strip()
      if line:
        para.append(line)
      elif para:
        yield " ".join(para)
        para = []
    if para:
      yield " ".join(para)


def iter_jsonl(path: str, required: str, stats: SourceStats) -> Iterator[dict]:
  """JSON objects of a JSON Lines file; each must hold the field `required`."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      line = stats.decode(raw, path).strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}:{n}: not JSON ({e.msg})") from None
      if not isinstance(obj, dict) or required not in obj:
        raise SystemExit(f"error: {path}:{n}: no field {required!r}; set the field name")
      yield obj


def _jsonl_documents(path, text_field, stats):
  for obj in iter_jsonl(path, text_field, stats):
    text = str(obj[text_field]).strip()
    if text:
      yield text


def _tfds_documents(spec, text_field, data_dir, stats):
  import tensorflow_datasets as tfds
  name, _, split = spec[len("tfds:"):].partition(":")
  try:
    source = tfds.data_source(name, split=split or "train", data_dir=data_dir,
                              download=False)
  except Exception as e:  # tfds raises many types for a missing dataset
    raise SystemExit(f"error: {spec}: cannot open tfds dataset ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); prepare it in "
                     "array_record format under --tfds-data-dir") from None
  for i in range(len(source)):
    value = source[i].get(text_field) if isinstance(source[i], dict) else None
    if value is None:
      raise SystemExit(f"error: {spec}: no feature {text_field!r}; set --text-field")
    text = stats.decode(value, spec) if isinstance(value, bytes) else str(value)
    if text.strip():
      yield text.strip()


def iter_documents(inputs: Iterable[str], *, doc_sep: str = "line",
                   text_field: str = "text", tfds_data_dir: str | None = None,
                   stats: SourceStats | None = None) -> Iterator[str]:
  """Documents from text files, JSON Lines, `demo`, or `tfds:NAME[:SPLIT]`."""
  stats = stats or SourceStats()
  for src in inputs:
    if src == "demo":
      from amos_jax.data import corpus
      yield from corpus.demo_documents()
    elif src.startswith("tfds:"):
      yield from _tfds_documents(src, text_field, tfds_data_dir, stats)
    elif src.endswith((".jsonl", ".json")):
      yield from _jsonl_documents(src, text_field, stats)
    else:
      yield from _text_documents(src, doc_sep, stats)


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
  return [encode_record(*acc) for acc in per_doc if acc[0]]


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


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def shard_name(k: int, n: int) -> str:
  return f"tokens-{k:05d}-of-{n:05d}.array_record"


def prepare(inputs: list[str], out_dir: str, *, tokenizer: str | None = None,
            train_tokenizer: bool = False, vocab_size: int = 8000,
            model_type: str = "unigram", seq_len: int = 512, num_shards: int = 4,
            workers: int = 1, doc_sep: str = "line", text_field: str = "text",
            tfds_data_dir: str | None = None, limit: int | None = None,
            strict_utf8: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict:
  """Writes shards + manifest to out_dir (atomically); returns the manifest."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  if (tokenizer is None) == (not train_tokenizer):
    raise SystemExit("error: give exactly one of --tokenizer PATH or --train-tokenizer")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(os.path.join(out_dir, MANIFEST)) and not overwrite:
    raise SystemExit(f"error: {out_dir} already holds prepared data; pass --overwrite")
  inputs = expand_inputs(inputs)
  stats = SourceStats(strict_utf8)

  def documents():
    it = iter_documents(inputs, doc_sep=doc_sep, text_field=text_field,
                        tfds_data_dir=tfds_data_dir, stats=stats)
    for i, doc in enumerate(it):
      if limit is not None and i >= limit:
        return
      yield doc

  tmp = os.path.join(os.path.dirname(out_dir),
                     f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    if train_tokenizer:
      docs = list(documents())
      if not docs:
        raise SystemExit(f"error: empty corpus: no documents in {', '.join(inputs)}")
      tok = tk.train_sentencepiece(docs, vocab_size, model_type)
    else:
      docs = None
      tok = tk.load_tokenizer(tokenizer)
    tok_dir = tok.save(os.path.join(tmp, "tokenizer"))

    names = [shard_name(k, num_shards) for k in range(num_shards)]
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
      for records in encoded:
        for rec in records:
          k = n_docs % num_shards
          writers[k].write(rec)
          counts[k] += (1, len(rec) // 4)
          n_docs += 1
          n_tokens += len(rec) // 4
        bar.update(len(records))
        rate = n_tokens / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(tokens=n_tokens, tok_s=f"{rate:,.0f}", refresh=False)
    finally:
      bar.close()
      for w in writers:
        w.close()
      if pool is not None:
        pool.terminate()
    if n_docs == 0:
      raise SystemExit(f"error: empty corpus: no documents in {', '.join(inputs)}")

    shards = [dict(file=n, num_records=int(c[0]), num_tokens=int(c[1]),
                   bytes=os.path.getsize(os.path.join(tmp, n)),
                   sha256=_sha256(os.path.join(tmp, n))) for n, c in zip(names, counts)]
    overall = hashlib.sha256(tok.fingerprint.encode())
    for s in shards:
      overall.update(s["sha256"].encode())
    manifest = dict(
        format=FORMAT, tokenizer=dict(tok.describe(), dir="tokenizer"),
        seq_len=int(seq_len), num_documents=n_docs, num_tokens=n_tokens,
        shards=shards, checksum=overall.hexdigest(),
        sources=[os.path.abspath(s) if os.path.exists(s) else s for s in inputs],
        invalid_utf8_lines=sum(stats.bad_utf8.values()))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  for line in stats.warnings():
    print(line, file=sys.stderr)
  return manifest


# ------------------------------------------------------------ reading back
def load_manifest(data_dir: str, verify: bool = False) -> dict:
  """Reads manifest.json and checks every shard is present and whole.

  Sizes are always checked (cheap); `verify` also re-hashes every shard.
  """
  path = os.path.join(os.path.expanduser(data_dir), MANIFEST)
  if not os.path.exists(path):
    raise SystemExit(f"error: {data_dir}: no {MANIFEST}; run amos-prepare first "
                     "(a directory without one is incomplete)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SystemExit(f"error: {path}: corrupt manifest ({e})") from None
  if manifest.get("format") != FORMAT:
    raise SystemExit(f"error: {path}: format {manifest.get('format')!r}, expected {FORMAT}")
  for s in manifest["shards"]:
    f = os.path.join(os.path.dirname(path), s["file"])
    if not os.path.exists(f):
      raise SystemExit(f"error: missing shard {f}; re-run amos-prepare")
    if os.path.getsize(f) != s["bytes"]:
      raise SystemExit(f"error: corrupt or truncated shard {f} ({os.path.getsize(f)} "
                       f"bytes, manifest says {s['bytes']}); re-run amos-prepare")
    if verify and _sha256(f) != s["sha256"]:
      raise SystemExit(f"error: corrupt shard {f}: sha256 differs from the manifest")
  manifest["dir"] = os.path.dirname(os.path.abspath(path))
  return manifest


def shard_paths(manifest: dict) -> list[str]:
  return [os.path.join(manifest["dir"], s["file"]) for s in manifest["shards"]]


def check_vocab(manifest: dict, vocab_size: int | None = None,
                tokenizer: tk.Tokenizer | None = None) -> None:
  """Stops with one line when prepared data and the model disagree on the vocabulary."""
  t = manifest["tokenizer"]
  if vocab_size is not None and t["vocab_size"] > vocab_size:
    raise SystemExit(
        f"error: data in {manifest['dir']} was tokenized with vocab_size {t['vocab_size']} "
        f"but the model has model.vocab_size={vocab_size}; set it to {t['vocab_size']} "
        "or re-run amos-prepare with the model's tokenizer")
  if tokenizer is not None and tokenizer.fingerprint != t["fingerprint"]:
    raise SystemExit(
        f"error: data in {manifest['dir']} was tokenized with a different tokenizer "
        f"({t['type']} {t['fingerprint']}, expected {tokenizer.kind} "
        f"{tokenizer.fingerprint}); re-run amos-prepare --tokenizer with the model's")


# --------------------------------------------------------------------- CLI
def _parser():
  p = argparse.ArgumentParser(
      prog="amos-prepare", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", action="append", default=[],
                 help="file, glob, 'demo', or tfds:NAME[:SPLIT] (repeatable)")
  p.add_argument("--out", help="output directory")
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
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--verify", metavar="DIR", help="re-hash a prepared directory and exit")
  p.add_argument("--register-tfds", metavar="NAME",
                 help="register --input text as tfds dataset amos_text/NAME and exit")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.verify:
      m = load_manifest(args.verify, verify=True)
      print(f"ok: {m['num_documents']} documents, {m['num_tokens']} tokens, "
            f"{len(m['shards'])} shards, checksum {m['checksum'][:16]}")
      return 0
    if not args.input:
      raise SystemExit("error: --input is required (a file, glob, 'demo' or tfds:NAME)")
    if args.register_tfds:
      from amos_jax.data import tfds_builder
      name = tfds_builder.register_text_corpus(
          args.register_tfds, expand_inputs(args.input),
          data_dir=args.tfds_data_dir, doc_sep=args.doc_sep, text_field=args.text_field)
      print(f"ok: registered tfds dataset {name} under {args.tfds_data_dir}")
      return 0
    if not args.out:
      raise SystemExit("error: --out is required")
    if args.num_shards < 1 or args.seq_len < 3:
      raise SystemExit("error: --num-shards must be >= 1 and --seq-len >= 3")
    m = prepare(args.input, args.out, tokenizer=args.tokenizer,
                train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size,
                model_type=args.model_type, seq_len=args.seq_len,
                num_shards=args.num_shards, workers=args.workers, doc_sep=args.doc_sep,
                text_field=args.text_field, tfds_data_dir=args.tfds_data_dir,
                limit=args.limit, strict_utf8=args.strict_utf8,
                overwrite=args.overwrite, progress=not args.quiet)
    print(f"ok: {m['num_documents']} documents, {m['num_tokens']} tokens -> {args.out}")
    return 0
  except SystemExit as e:
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      return 2
    raise
  except OSError as e:
    print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
