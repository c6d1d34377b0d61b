"""Documents from text sources, and the embedded default corpus.

Sources (`iter_documents`): text files (one document per line, or blank-line
separated), JSON Lines, `demo`, `tfds:NAME[:SPLIT]`. Lines that are not UTF-8 are
counted per file (`SourceStats`) and reported once; a file that is mostly not UTF-8
text (binary, compressed, UTF-16) is refused with one line naming it.

The embedded corpus (`demo`) is real English text that the `gensim` wheel ships,
under `gensim/test/test_data/`:
  * a shortened English Wikipedia XML dump (206 articles, wiki markup stripped);
  * the Lee news corpus (300 + 50 Australian news articles, one per line).
No download happens: the files are installed with the package.
"""
from __future__ import annotations

import bz2
import functools
import glob
import json
import logging
import os
import re
from typing import Iterable, Iterator

from amos_jax.errors import ConfigError, DataError

log = logging.getLogger("amos_jax")

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILES = ("lee_background.cor", "lee.cor")


def gensim_test_data_dir() -> str:
  try:
    import gensim  # noqa: F401  (only its data files are used)
  except ImportError as e:  # pragma: no cover - gensim is a pinned dependency
    raise DataError("the embedded corpus needs the `gensim` package; run `make demo` or "
                    "`pip install gensim`") from e
  import gensim.test
  return os.path.join(os.path.dirname(gensim.test.__file__), "test_data")


def _clean_paragraphs(text: str) -> str:
  # filter_wiki leaves section headings (=== X ===), list bullets and blank runs.
  lines = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("=") or len(line.split()) < 4:
      continue
    line = re.sub(r"'{2,}", "", line.lstrip("*#:; "))  # bold/italic quotes
    lines.append(re.sub(r"\s+", " ", line))
  return " ".join(lines)


@functools.lru_cache(maxsize=None)
def wikipedia_documents(min_words: int = 50) -> tuple[str, ...]:
  """Article bodies from the Wikipedia sample, markup removed, one string each."""
  from gensim.corpora.wikicorpus import extract_pages, filter_wiki
  path = os.path.join(gensim_test_data_dir(), _WIKI_FILE)
  docs = []
  with bz2.open(path, "rb") as f:
    for title, text, _ in extract_pages(f):
      if not text or text.lstrip().lower().startswith("#redirect"):
        continue
      body = _clean_paragraphs(filter_wiki(text))
      if len(body.split()) >= min_words:
        docs.append(body)
  return tuple(docs)


@functools.lru_cache(maxsize=None)
def news_documents() -> tuple[str, ...]:
  """The Lee news corpus: one article per line."""
  docs = []
  for name in _NEWS_FILES:
    with open(os.path.join(gensim_test_data_dir(), name), encoding="utf-8",
              errors="replace") as f:
      docs.extend(line.strip() for line in f if line.strip())
  return tuple(docs)


def demo_documents() -> list[str]:
  """All embedded documents, in a fixed order (Wikipedia, then news)."""
  return list(wikipedia_documents()) + list(news_documents())


# ------------------------------------------------------------------ sources
# Leading bytes of files that are certainly not UTF-8 text, with the fix to name.
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
    (b"BZh", "bzip2-compressed; decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed; decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive; extract the text files first"),
    (b"\xff\xfe", "UTF-16; convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "UTF-16; convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8)"),
)


def check_text_file(path: str) -> None:
  """Refuses a file whose first bytes say it is compressed, an archive or UTF-16."""
  with open(path, "rb") as f:
    head = f.read(8)
  for magic, what in _NOT_TEXT:
    if head.startswith(magic):
      raise DataError(f"{path} is not UTF-8 text: it is {what}")


class SourceStats:
  """Counts of undecodable lines per file, reported once instead of per line.

  A line that is not UTF-8, or holds a NUL byte (never part of text), is bad; its
  bad bytes become U+FFFD. `check(where)` refuses a file where more than half of
  the lines or of the bytes are bad: that is binary data, not a corpus with typos.
  """

  def __init__(self, strict_utf8: bool = False):
    self.strict_utf8 = strict_utf8
    self.bad_utf8: dict[str, int] = {}
    self._seen: dict[str, list[int]] = {}  # where -> [lines, bytes, bad bytes]

  def decode(self, raw: bytes, where: str) -> str:
    seen = self._seen.setdefault(where, [0, 0, 0])
    if raw.strip():
      seen[0] += 1
    seen[1] += len(raw)
    try:
      text = raw.decode("utf-8")
      if "\x00" not in text:
        return text
      reason = f"NUL byte at byte {text.index(chr(0))}"
      text = text.replace("\x00", "\ufffd")
    except UnicodeDecodeError as e:
      reason = f"{e.reason} at byte {e.start}"
      text = raw.decode("utf-8", errors="replace")
    if self.strict_utf8:
      raise DataError(f"{where}: invalid UTF-8 ({reason}); fix the file or drop "
                      "--strict-utf8")
    self.bad_utf8[where] = self.bad_utf8.get(where, 0) + 1
    seen[2] += len(raw)
    return text

  def check(self, where: str) -> None:
    """Raises DataError when most of `where` (lines or bytes) is not UTF-8 text."""
    lines, size, bad_bytes = self._seen.get(where, (0, 0, 0))
    bad = self.bad_utf8.get(where, 0)
    if 2 * bad > lines or 2 * bad_bytes > size:
      raise DataError(f"{where} is not UTF-8 text ({bad} of {lines} lines do not "
                      "decode: binary or another encoding); give UTF-8 text files")

  def warnings(self) -> list[str]:
    return [f"{f}: {n} line(s) had invalid UTF-8; bad bytes replaced with U+FFFD"
            for f, n in self.bad_utf8.items()]

  def log_warnings(self) -> None:
    for line in self.warnings():
      log.warning(line)


def expand_inputs(patterns: Iterable[str], what: str = "--input",
                  specs: bool = True, hint: str | None = None) -> list[str]:
  """Globs -> sorted existing files; with `specs`, `demo` and `tfds:` pass through.

  what: the flag or config key the patterns came from; hint: what to give instead
  (both for the error message).
  """
  hint = hint or ("give a file, a glob, 'demo' or tfds:NAME" if specs else
                  "give a file or a glob")
  out = []
  for pat in patterns:
    if specs and (pat == "demo" or pat.startswith("tfds:")):
      out.append(pat)
      continue
    pat = os.path.expanduser(pat)
    matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
      folders = [m for m in matches if os.path.isdir(m)]
      if folders:
        kind = "is a folder" if folders == [pat] else "matches only folders"
        raise DataError(f"{what} {pat} {kind}; give a file or a glob like "
                        f"{os.path.join(folders[0], '*.txt')}")
      if glob.has_magic(pat):
        raise DataError(f"{what} {pat}: no file matches; {hint}")
      raise DataError(f"{what} {pat}: no such file; {hint}")
    out.extend(files)
  return out


def text_documents(path: str, doc_sep: str, stats: SourceStats) -> Iterator[str]:
  """Documents of a text file: one per line, or blank-line separated paragraphs."""
  check_text_file(path)
  with open(path, "rb") as f:
    if doc_sep == "line":
      for raw in f:
        text = stats.decode(raw, path).strip()
        if text:
          yield text
    else:
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
  stats.check(path)


def iter_jsonl(path: str, required: str, stats: SourceStats) -> Iterator[dict]:
  """JSON objects of a JSON Lines file; each must hold the field `required`."""
  check_text_file(path)
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      line = stats.decode(raw, path).strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not JSON ({e.msg}); give one JSON object "
                        "per line") from None
      if not isinstance(obj, dict) or required not in obj:
        raise DataError(f"{path}:{n}: no field {required!r}; set the field name")
      yield obj
  stats.check(path)


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
    first = str(e).splitlines()[0] if str(e) else ""
    raise DataError(f"{spec}: cannot open tfds dataset ({type(e).__name__}: {first}); "
                    "prepare it in array_record format under --tfds-data-dir") from None
  for i in range(len(source)):
    value = source[i].get(text_field) if isinstance(source[i], dict) else None
    if value is None:
      raise ConfigError(f"{spec}: no feature {text_field!r}; set --text-field")
    text = stats.decode(value, spec) if isinstance(value, bytes) else str(value)
    if text.strip():
      yield text.strip()
  stats.check(spec)


def iter_documents(inputs: Iterable[str], *, doc_sep: str = "line",
                   text_field: str = "text", tfds_data_dir: str | None = None,
                   stats: SourceStats | None = None) -> Iterator[str]:
  """Documents from text files, JSON Lines, `demo`, or `tfds:NAME[:SPLIT]`."""
  stats = stats or SourceStats()
  for src in inputs:
    if src == "demo":
      yield from demo_documents()
    elif src.startswith("tfds:"):
      yield from _tfds_documents(src, text_field, tfds_data_dir, stats)
    elif src.endswith((".jsonl", ".json")):
      yield from _jsonl_documents(src, text_field, stats)
    else:
      yield from text_documents(src, doc_sep, stats)
