"""Tokenizers: sentencepiece (trained here or loaded) and BERT WordPiece `vocab.txt`.

Both sit behind one interface, `Tokenizer`:
  encode(text) -> (ids, word_starts)   no special tokens added
  encode_batch(texts) -> list of those
  decode(ids) -> str                   special tokens dropped
  vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id
  save(dir); fingerprint (content hash, recorded in prepared-data manifests)

`word_starts[i]` is True where token i begins a whitespace/punctuation-delimited
word; whole-word masking groups a word-start token with the non-starts after it.

Our sentencepiece models reserve [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. A WordPiece
vocabulary keeps whatever ids its `vocab.txt` gives those tokens.
`load_tokenizer(spec)` accepts a directory written by `save`, a `.model` file, a
`vocab.txt`, or `sentencepiece:PATH` / `wordpiece:PATH`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from amos_jax import paths
from amos_jax.errors import ConfigError, DataError, one_line

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_FILE = "amos_tokenizer.json"
_SP_FILE = "spm.model"
_WP_FILE = "vocab.txt"


class Tokenizer:
  """The interface the data pipeline and objectives use."""
  kind: str = ""
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int

  def encode(self, text: str) -> tuple[list[int], list[bool]]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def save(self, directory: str) -> str:
    raise NotImplementedError

  @property
  def fingerprint(self) -> str:
    raise NotImplementedError

  def special_ids(self) -> dict[str, int]:
    return dict(pad_id=self.pad_id, unk_id=self.unk_id, cls_id=self.cls_id,
                sep_id=self.sep_id, mask_id=self.mask_id)

  def describe(self) -> dict:
    """What a manifest records to match prepared data against a model later."""
    return dict(type=self.kind, vocab_size=self.vocab_size,
                fingerprint=self.fingerprint, **self.special_ids())


_write_atomic = paths.write_atomic


def _write_config(directory: str, config: dict) -> None:
  _write_atomic(paths.join(directory, CONFIG_FILE),
                (json.dumps(config, indent=2) + "\n").encode())


# ---------------------------------------------------------------- sentencepiece
class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; ids of the five special tokens are read from it."""
  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, num_threads: int = 0):
    import sentencepiece as spm
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._num_threads = num_threads
    self.vocab_size = self._sp.get_piece_size()
    ids = {}
    for name, piece in zip(("pad_id", "unk_id", "cls_id", "sep_id", "mask_id"),
                           SPECIAL_TOKENS):
      i = self._sp.piece_to_id(piece)
      if name != "unk_id" and i == self._sp.unk_id():
        raise DataError(
            f"sentencepiece model has no {piece} piece; train it with "
            "train_sentencepiece (which reserves [PAD] [UNK] [CLS] [SEP] [MASK])")
      ids[name] = i
    ids["unk_id"] = self._sp.unk_id()
    for k, v in ids.items():
      setattr(self, k, v)
    # A piece starting with U+2581 follows whitespace: it opens a word.
    self._starts_word = np.array(
        [self._sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)])

  @classmethod
  def from_file(cls, path: str) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode_batch(self, texts):
    all_ids = self._sp.encode(list(texts), num_threads=self._num_threads)
    out = []
    for ids in all_ids:
      starts = self._starts_word[ids].tolist() if ids else []
      if starts:
        starts[0] = True
      out.append((ids, starts))
    return out

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  def normalize(self, text: str) -> str:
    """The text as the model sees it (NFKC, whitespace collapsed)."""
    return self._sp.normalize(text).replace("\u2581", " ").strip()

  def save(self, directory):
    paths.makedirs(directory)
    _write_atomic(paths.join(directory, _SP_FILE), self._proto)
    _write_config(directory, dict(type=self.kind, file=_SP_FILE))
    return directory

  @property
  def fingerprint(self):
    return hashlib.sha256(self._proto).hexdigest()[:16]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _training_sentences(documents: Iterable[str], max_bytes: int = 3000):
  """Sentence-sized pieces; sentencepiece silently drops longer training lines."""
  for doc in documents:
    for sent in _SENTENCE_END.split(doc):
      sent = sent.strip()
      if not sent:
        continue
      if len(sent.encode()) <= max_bytes:
        yield sent
        continue
      words, chunk, size = sent.split(), [], 0
      for w in words:
        if size + len(w) + 1 > max_bytes // 4 and chunk:  # // 4: up to 4 bytes/char
          yield " ".join(chunk)
          chunk, size = [], 0
        chunk.append(w[:max_bytes // 4])
        size += len(w) + 1
      if chunk:
        yield " ".join(chunk)


_TOO_SMALL = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value "
                        r"<= (\d+)")


def _training_error(e: RuntimeError, vocab_size: int, vocab_flag: str):
  """sentencepiece's failure -> one line with the fix (its own text is C++ detail)."""
  text = str(e).strip()
  if m := _TOO_SMALL.search(text):
    return ConfigError(f"{vocab_flag}={vocab_size} is smaller than the corpus's "
                       f"characters need; raise it to at least {m.group(1)}")
  if m := _TOO_LARGE.search(text):
    return ConfigError(f"{vocab_flag}={vocab_size} is too large for this corpus; lower "
                       f"it to at most {m.group(1)} or give more text")
  return DataError(f"sentencepiece training failed ({one_line(text)})")


def train_sentencepiece(documents: Iterable[str], vocab_size: int = 8000,
                        model_type: str = "unigram", out_prefix: str | None = None,
                        *, character_coverage: float = 0.9995,
                        byte_fallback: bool = False, num_threads: int = 2,
                        max_sentences: int = 200_000,
                        vocab_flag: str = "vocab_size") -> SentencePieceTokenizer:
  """Trains a sentencepiece model with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.

  Deterministic for a given input and `num_threads` (the result depends on the
  thread count, so it is fixed here rather than taken from the machine). At most
  `max_sentences` sentences are used, taken at an even stride, so large corpora
  train in seconds. Writes `{out_prefix}.model` when out_prefix is given.
  vocab_flag: how the caller's user sets vocab_size (named in errors), e.g.
  "--vocab-size" or "model.vocab_size".
  """
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise ConfigError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ConfigError(
        f"{vocab_flag}={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special "
        "tokens alone take that many; use a few thousand (8000 is usual)")
  sentences = list(_training_sentences(documents))
  if not sentences:
    raise DataError("cannot train a tokenizer on an empty corpus; give text")
  if len(sentences) > max_sentences:
    sentences = sentences[::-(-len(sentences) // max_sentences)]
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf,
        vocab_size=int(vocab_size), model_type=model_type,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        pad_piece="[PAD]", unk_piece="[UNK]",
        # Control symbols are never produced from text: "[MASK]" typed in a
        # document stays ordinary characters.
        control_symbols=list(SPECIAL_TOKENS[2:]),
        character_coverage=character_coverage, byte_fallback=byte_fallback,
        num_threads=num_threads, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=1 << 14, minloglevel=2)
  except RuntimeError as e:
    raise _training_error(e, vocab_size, vocab_flag) from None
  tok = SentencePieceTokenizer(buf.getvalue())
  if out_prefix:
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    _write_atomic(out_prefix + ".model", buf.getvalue())
  return tok


# -------------------------------------------------------------------- WordPiece
class WordPieceTokenizer(Tokenizer):
  """BERT-family `vocab.txt` through `tokenizers.BertWordPieceTokenizer`."""
  kind = "wordpiece"

  def __init__(self, vocab_path: str, lowercase: bool = True):
    from tokenizers import BertWordPieceTokenizer
    self._vocab_path = vocab_path
    self.lowercase = bool(lowercase)
    self._tok = BertWordPieceTokenizer(vocab_path, lowercase=self.lowercase)
    self.vocab_size = self._tok.get_vocab_size()
    for name, piece in zip(("pad_id", "unk_id", "cls_id", "sep_id", "mask_id"),
                           SPECIAL_TOKENS):
      i = self._tok.token_to_id(piece)
      if i is None:
        raise DataError(f"{vocab_path} has no {piece} token; give a BERT vocab.txt")
      setattr(self, name, i)

  def encode_batch(self, texts):
    out = []
    for enc in self._tok.encode_batch(list(texts), add_special_tokens=False):
      # "##" marks a continuation piece, as in BERT's whole-word masking.
      out.append((list(enc.ids), [not t.startswith("##") for t in enc.tokens]))
    return out

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, directory):
    paths.makedirs(directory)
    with open(self._vocab_path, "rb") as f:
      _write_atomic(paths.join(directory, _WP_FILE), f.read())
    _write_config(directory, dict(type=self.kind, file=_WP_FILE, lowercase=self.lowercase))
    return directory

  @property
  def fingerprint(self):
    with open(self._vocab_path, "rb") as f:
      h = hashlib.sha256(f.read())
    h.update(b"lower" if self.lowercase else b"cased")
    return h.hexdigest()[:16]


def _hf_lowercase(directory: str) -> bool:
  """`do_lower_case` from a Hugging Face tokenizer_config.json, if present."""
  path = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(path):
    with open(path) as f:
      return bool(json.load(f).get("do_lower_case", True))
  return True


# ----------------------------------------------------------------------- loader
def load_tokenizer(spec: str, lowercase: bool | None = None) -> Tokenizer:
  """Tokenizer from a saved directory, a `.model`, a `vocab.txt`, or `kind:PATH`."""
  kind = None
  if spec.startswith(("sentencepiece:", "wordpiece:")):
    kind, spec = spec.split(":", 1)
  path = os.path.expanduser(spec)
  if not paths.exists(path):
    raise DataError(f"tokenizer not found: {spec} (give a directory written by "
                    "Tokenizer.save, a sentencepiece .model, or a BERT vocab.txt)")
  if not paths.is_local(path):
    path = paths.local_copy(path, cached=False)  # a small folder, read from here on
  if os.path.isdir(path):
    cfg_path = os.path.join(path, CONFIG_FILE)
    if os.path.exists(cfg_path):
      try:
        with open(cfg_path) as f:
          cfg = json.load(f)
        kind, file = cfg["type"], os.path.join(path, cfg["file"])
      except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{cfg_path}: corrupt tokenizer config ({type(e).__name__}: "
                        f"{one_line(e)}); save the tokenizer again") from None
      if lowercase is None and "lowercase" in cfg:
        lowercase = cfg["lowercase"]
    elif os.path.exists(os.path.join(path, _SP_FILE)):
      kind, file = "sentencepiece", os.path.join(path, _SP_FILE)
    elif os.path.exists(os.path.join(path, _WP_FILE)):
      kind, file = "wordpiece", os.path.join(path, _WP_FILE)
    else:
      raise DataError(f"{spec} holds no tokenizer ({CONFIG_FILE}, {_SP_FILE} "
                      f"or {_WP_FILE}); give a tokenizer folder or file")
    directory = path
  else:
    file, directory = path, os.path.dirname(path)
    if kind is None:
      kind = "wordpiece" if path.endswith(".txt") else "sentencepiece"
  if kind == "sentencepiece":
    try:
      return SentencePieceTokenizer.from_file(file)
    except RuntimeError as e:
      raise DataError(f"{file} is not a sentencepiece model ({one_line(e)})") from None
  if lowercase is None:
    lowercase = _hf_lowercase(directory)
  return WordPieceTokenizer(file, lowercase=lowercase)
