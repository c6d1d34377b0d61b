"""The prepared-data format: token records, shard names and the manifest.

A prepared-data folder (written by `amos-prepare`, read by `pipeline`) holds
`tokens-XXXXX-of-NNNNN.array_record` shards (one record per document), `tokenizer/`
and `manifest.json` (format, tokenizer description, counts, per-shard and overall
sha256). A folder with our manifest is complete: it is written last.

Record format: little-endian uint32 per token; bits 0-29 the token id, bit 30 set
where a sentence starts (for sentence-pair segments), bit 31 where a word starts
(for whole-word masking).
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from amos_jax import paths
from amos_jax.errors import ConfigError, DataError

FORMAT = "amos_jax.tokens.v1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
ID_MASK = (1 << 30) - 1
SENT_BIT = np.uint32(1 << 30)
WORD_BIT = np.uint32(1 << 31)
_SHARD_NAME = re.compile(r"tokens-\d{5}-of-\d{5}\.array_record")


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
  return ((v & ID_MASK).astype(np.int32), (v & WORD_BIT) != 0, (v & SENT_BIT) != 0)


# ------------------------------------------------------------------- shards
def shard_name(k: int, n: int) -> str:
  return f"tokens-{k:05d}-of-{n:05d}.array_record"


def is_own_entry(name: str) -> bool:
  """True for a name that amos-prepare writes into a prepared-data folder."""
  return name in (MANIFEST, TOKENIZER_DIR) or bool(_SHARD_NAME.fullmatch(name))


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def overall_checksum(tokenizer_fingerprint: str, shards: list[dict]) -> str:
  """One hash over the tokenizer and every shard's sha256, in shard order."""
  h = hashlib.sha256(tokenizer_fingerprint.encode())
  for s in shards:
    h.update(s["sha256"].encode())
  return h.hexdigest()


def shard_paths(manifest: dict) -> list[str]:
  return [os.path.join(manifest["dir"], s["file"]) for s in manifest["shards"]]


# ----------------------------------------------------------------- manifest
def write_manifest(directory: str, manifest: dict) -> None:
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def read_manifest_format(directory: str) -> str | None:
  """The `format` of directory/manifest.json; None if absent or unreadable."""
  try:
    manifest = paths.read_json(paths.join(directory, MANIFEST))
  except (OSError, ValueError):
    return None
  return manifest.get("format") if isinstance(manifest, dict) else None


def load_manifest(data_dir: str, verify: bool = False) -> dict:
  """Reads manifest.json and checks every shard is present and whole.

  Sizes are always checked (cheap); `verify` also re-hashes every shard.
  """
  if not paths.is_local(data_dir):
    if not paths.exists(paths.join(data_dir, MANIFEST)):
      raise DataError(f"{data_dir}: no {MANIFEST}; run amos-prepare first "
                      "(a directory without one is incomplete)")
    # ArrayRecord reads local files only: the shards are read from a local cache,
    # fetched once per shard version.
    data_dir = paths.local_copy(data_dir)
  path = os.path.join(os.path.expanduser(data_dir), MANIFEST)
  if not os.path.exists(path):
    raise DataError(f"{data_dir}: no {MANIFEST}; run amos-prepare first "
                    "(a directory without one is incomplete)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError
    raise DataError(f"{path}: corrupt or unreadable manifest ({e}); "
                    "re-run amos-prepare") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else None
    raise DataError(f"{path}: format {got!r}, expected {FORMAT}; re-run amos-prepare")
  for s in manifest["shards"]:
    f = os.path.join(os.path.dirname(path), s["file"])
    if not os.path.exists(f):
      raise DataError(f"missing shard {f}; re-run amos-prepare")
    if os.path.getsize(f) != s["bytes"]:
      raise DataError(f"corrupt or truncated shard {f} ({os.path.getsize(f)} bytes, "
                      f"manifest says {s['bytes']}); re-run amos-prepare")
    if verify and sha256_file(f) != s["sha256"]:
      raise DataError(f"corrupt shard {f}: sha256 differs from the manifest; "
                      "re-run amos-prepare")
  manifest["dir"] = os.path.dirname(os.path.abspath(path))
  return manifest


def check_vocab(manifest: dict, vocab_size: int | None = None, tokenizer=None) -> None:
  """Raises when prepared data and the model disagree on the vocabulary.

  tokenizer: a `tokenizer.Tokenizer` (its fingerprint is compared), or None.
  """
  t = manifest["tokenizer"]
  if vocab_size is not None and t["vocab_size"] > vocab_size:
    raise ConfigError(
        f"data in {manifest['dir']} was tokenized with vocab_size {t['vocab_size']} "
        f"but the model has model.vocab_size={vocab_size}; set it to {t['vocab_size']} "
        "or re-run amos-prepare with the model's tokenizer")
  if tokenizer is not None and tokenizer.fingerprint != t["fingerprint"]:
    raise DataError(
        f"data in {manifest['dir']} was tokenized with a different tokenizer "
        f"({t['type']} {t['fingerprint']}, expected {tokenizer.kind} "
        f"{tokenizer.fingerprint}); re-run amos-prepare --tokenizer with the model's")
