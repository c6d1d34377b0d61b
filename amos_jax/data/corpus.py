"""The embedded default corpus: real English text that the `gensim` wheel ships.

Two sources, both under `gensim/test/test_data/`:
  * a shortened English Wikipedia XML dump (206 articles, wiki markup stripped);
  * the Lee news corpus (300 + 50 Australian news articles, one per line).
No download happens: the files are installed with the package.
"""
from __future__ import annotations

import bz2
import functools
import os
import re

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILES = ("lee_background.cor", "lee.cor")


def gensim_test_data_dir() -> str:
  try:
    import gensim  # noqa: F401  (only its data files are used)
  except ImportError as e:  # pragma: no cover - gensim is a pinned dependency
    raise SystemExit(
        "error: the embedded corpus needs the `gensim` package; run `make demo` or "
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
