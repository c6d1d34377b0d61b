"""Dense retrieval on a BEIR-layout folder, scored as BEIR scores it.

  corpus.jsonl      {"_id", "title", "text"}: a document is title + " " + text
  queries.jsonl     {"_id", "text"}
  qrels/<split>.tsv query-id, corpus-id, score (graded), with or without a header
Only queries with qrels are evaluated (BEIR's loader keeps only those). The corpus is
ordered by document id, so the exact search's tie-break (lower row first) is a
tie-break by id; a query whose own id is also a document id never retrieves that
document (BEIR's `ignore_identical_ids`). Search is exact (`search.exact_search`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from amos_jax.errors import DataError
from amos_jax.eval.metrics import RETRIEVAL_METRICS, retrieval_scores
from amos_jax.eval.model import EmbeddingModel, embed_layers, truncate_normalize
from amos_jax.eval.search import exact_search

SIMILARITIES = ("cos", "dot")


@dataclasses.dataclass
class BEIRSet:
  """doc_ids sorted; query_ids those with qrels; qrels {query id: {doc id: grade}}."""
  name: str
  doc_ids: list[str]
  doc_texts: list[str]
  query_ids: list[str]
  query_texts: list[str]
  qrels: dict[str, dict[str, int]]


def _jsonl(path: str):
  if not os.path.isfile(path):
    raise DataError(f"{path} not found; a BEIR folder holds corpus.jsonl, queries.jsonl "
                    "and qrels/<split>.tsv")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
      if "_id" not in row:
        raise DataError(f"{path}:{n}: no \"_id\" field (BEIR layout)")
      yield row


def read_corpus(path: str) -> tuple[list[str], list[str]]:
  """(ids sorted, texts) of a BEIR corpus.jsonl; text = title + ' ' + text."""
  docs = {}
  try:
    for row in _jsonl(path):
      docs[str(row["_id"])] = (row.get("title", "") + " " + row.get("text", "")).strip()
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 (byte {e.start})") from None
  if not docs:
    raise DataError(f"{path} holds no documents")
  ids = sorted(docs)
  return ids, [docs[i] for i in ids]


def read_qrels(path: str) -> dict[str, dict[str, int]]:
  if not os.path.isfile(path):
    raise DataError(f"{path} not found; the BEIR folder has no qrels for this split "
                    "(pick --split, e.g. test or dev)")
  qrels: dict[str, dict[str, int]] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      fields = line.rstrip("\r\n").split("\t")
      if not line.strip():
        continue
      if len(fields) != 3:
        raise DataError(f"{path}:{n}: {len(fields)} fields; BEIR qrels rows are "
                        "query-id<TAB>corpus-id<TAB>score")
      try:
        grade = int(float(fields[2]))
      except ValueError:
        if n == 1:
          continue  # the header
        raise DataError(f"{path}:{n}: score {fields[2]!r} is not a number") from None
      qrels.setdefault(fields[0], {})[fields[1]] = grade
  if not qrels:
    raise DataError(f"{path} holds no judgements")
  return qrels


def load_beir(data: str, split: str = "test") -> BEIRSet:
  if not os.path.isdir(data):
    raise DataError(f"--data {data} is not a folder; give a BEIR folder (corpus.jsonl, "
                    "queries.jsonl, qrels/)")
  qrels_dir = os.path.join(data, "qrels")
  if not os.path.isdir(qrels_dir):
    raise DataError(f"{data} has no qrels/ folder; a BEIR folder holds qrels/<split>.tsv")
  qrels = read_qrels(os.path.join(qrels_dir, f"{split}.tsv"))
  doc_ids, doc_texts = read_corpus(os.path.join(data, "corpus.jsonl"))
  queries = {str(r["_id"]): r.get("text", "")
             for r in _jsonl(os.path.join(data, "queries.jsonl"))}
  missing = [q for q in qrels if q not in queries]
  if missing:
    raise DataError(f"{data}: {len(missing)} qrels queries are not in queries.jsonl "
                    f"(e.g. {missing[0]!r})")
  query_ids = sorted(qrels)
  return BEIRSet(os.path.basename(os.path.normpath(data)), doc_ids, doc_texts, query_ids,
                 [queries[q] for q in query_ids], qrels)


def _prepare(dim: int, similarity: str):
  return lambda rows: truncate_normalize(rows, dim, normalize=similarity == "cos")


def rank(beir: BEIRSet, queries: np.ndarray, corpus, k: int, prepare=None
         ) -> dict[str, list[str]]:
  """{query id: top-k doc ids} by exact search, each query's own id left out."""
  row_of = {d: i for i, d in enumerate(beir.doc_ids)}
  exclude = np.array([row_of.get(q, -1) for q in beir.query_ids], np.int32)
  _, rows = exact_search(queries, corpus, k, exclude=exclude, prepare=prepare)
  return {q: [beir.doc_ids[r] for r in rows[i] if r >= 0]
          for i, q in enumerate(beir.query_ids)}


def evaluate_sizes(model: EmbeddingModel, beir: BEIRSet, sizes, *, similarity: str = "cos",
                   metrics=RETRIEVAL_METRICS, memory_bytes: int = 4 << 30,
                   **embed_kw) -> dict[tuple[int, int], dict]:
  """{(layer, dim): mean metrics} for each size; texts are embedded once for all."""
  layers = sorted({l for l, _ in sizes})
  k = max(int(m.partition("@")[2]) for m in metrics)
  q_all = embed_layers(model, beir.query_texts, layers, desc="queries", **embed_kw)
  shape = (len(layers), len(beir.doc_texts), model.width)
  with tempfile.TemporaryDirectory(prefix="amos-eval-") as tmp:
    # A corpus matrix larger than `memory_bytes` lives on disk; the search streams it.
    c_all = (np.lib.format.open_memmap(os.path.join(tmp, "corpus.npy"), "w+", np.float32,
                                       shape)
             if 4 * np.prod(shape) > memory_bytes else None)
    c_all = embed_layers(model, beir.doc_texts, layers, desc="corpus", out=c_all,
                         **embed_kw)
    out = {}
    for layer, dim in sizes:
      li = layers.index(layer)
      prepare = _prepare(dim, similarity)
      rankings = rank(beir, prepare(q_all[li]), c_all[li], k, prepare)
      out[(layer, dim)], _ = retrieval_scores(beir.qrels, rankings, metrics)
    del c_all
  return out
