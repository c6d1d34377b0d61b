"""A semantic index of a corpus in Milvus: Milvus Lite (a local file) by default, a
Milvus server with `--uri http://host:port`; one client API for both.

A collection holds (id, vector, text) rows with an inner-product index, and records
which embeddings it holds (model, layer, dim, pooling, similarity) in a collection
property: adding or searching with other embeddings is refused, never mixed. Rows
are upserted by id, so building twice replaces rather than duplicates.

Two-stage search for 2D-Matryoshka models: a second collection `<name>_l<L>_d<D>`
holds the small (layer L, dim D) vectors; candidates come from it and are re-ranked
by the full-size vectors of the main collection.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from amos_jax.errors import DataError, one_line

META_KEY = "amos_embedding"
MAX_TEXT = 2000          # characters of each document kept for display
MAX_ID = 512


def _milvus():
  # pymilvus logs every failed call with a traceback; our errors say it in one line.
  logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
  import pymilvus
  return pymilvus


def connect(db: str | None = None, uri: str | None = None, token: str | None = None):
  """A MilvusClient: Milvus Lite on the file `db` (started by the client), or a server."""
  pymilvus = _milvus()
  target = uri or os.path.abspath(db)
  if not uri:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  try:
    return pymilvus.MilvusClient(uri=target, **({"token": token} if token else {}))
  except Exception as e:  # noqa: BLE001 - connection and server-start failures
    raise DataError(f"cannot open Milvus at {target} ({one_line(str(e))[:200]}); check "
                      "--db / --uri") from None


def collection_name(name: str) -> str:
  ok = name and (name[0].isalpha() or name[0] == "_") and all(
      c.isalnum() or c == "_" for c in name)
  if not ok:
    raise DataError(f"collection name {name!r}: use letters, digits and underscores, "
                      "starting with a letter")
  return name


def candidate_collection(name: str, layer: int, dim: int) -> str:
  return f"{name}_l{layer}_d{dim}"


def describe(meta: dict) -> str:
  return (f"{meta['model']} (layer {meta['layer']}, dim {meta['dim']}, {meta['pooling']} "
          f"pooling, {meta['similarity']})")


def stored_meta(client, name: str) -> dict | None:
  """The embedding description a collection was built with (None if it has none)."""
  props = client.describe_collection(name).get("properties", {}) or {}
  raw = props.get(META_KEY)
  return json.loads(raw) if raw else None


def require(client, name: str, meta: dict, where: str) -> None:
  """Refuses a missing collection, or one holding other embeddings than `meta`."""
  if not client.has_collection(name):
    raise DataError(f"collection {name!r} not found in {where}; build it first with "
                      "amos-index build (or pick --collection)")
  have = stored_meta(client, name)
  if have != meta:
    held = describe(have) if have else "vectors of unknown origin"
    raise DataError(f"collection {name!r} in {where} holds {held}, not {describe(meta)}; "
                      "use the same model and size, or another --collection")


def count(client, name: str) -> int:
  rows = client.query(name, filter="", output_fields=["count(*)"])
  return int(rows[0]["count(*)"])


def upsert(client, name: str, ids, vectors: np.ndarray, texts, meta: dict, where: str, *,
           index_type: str = "AUTOINDEX", index_params: dict | None = None,
           batch: int = 1000) -> int:
  """Creates the collection if needed (refusing other embeddings), then upserts rows.

  Returns the collection's entity count afterwards.
  """
  pymilvus = _milvus()
  dim = int(vectors.shape[1])
  if client.has_collection(name):
    require(client, name, meta, where)
  else:
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", pymilvus.DataType.VARCHAR, is_primary=True, max_length=MAX_ID)
    schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    # Up to 4 bytes per character in UTF-8.
    schema.add_field("text", pymilvus.DataType.VARCHAR, max_length=4 * MAX_TEXT)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", metric_type="IP", index_type=index_type,
                    params=index_params or {})
    client.create_collection(name, schema=schema, index_params=index,
                             properties={META_KEY: json.dumps(meta, sort_keys=True)})
  for start in range(0, len(ids), batch):
    rows = [dict(id=str(i)[:MAX_ID], vector=v.tolist(), text=(t or "")[:MAX_TEXT])
            for i, v, t in zip(ids[start:start + batch], vectors[start:start + batch],
                               texts[start:start + batch])]
    client.upsert(name, rows)
  client.flush(name)
  return count(client, name)


def search(client, name: str, queries: np.ndarray, k: int, *, batch: int = 256,
           search_params: dict | None = None, with_text: bool = False):
  """[[(id, score[, text]), ...] per query], best first."""
  client.load_collection(name)
  out = []
  for start in range(0, len(queries), batch):
    hits = client.search(name, data=queries[start:start + batch].tolist(), limit=int(k),
                         output_fields=["text"] if with_text else ["id"],
                         search_params=search_params or {})
    for row in hits:
      out.append([(h["id"], float(h["distance"])) + ((h["entity"].get("text", ""),)
                                                     if with_text else ())
                  for h in row])
  return out


def vectors_of(client, name: str, ids) -> dict[str, np.ndarray]:
  """{id: vector} for the given ids."""
  out = {}
  ids = list(dict.fromkeys(ids))
  for start in range(0, len(ids), 1000):
    for row in client.get(name, ids=ids[start:start + 1000], output_fields=["vector"]):
      out[row["id"]] = np.asarray(row["vector"], np.float32)
  return out


def all_vectors(client, name: str, batch: int = 2000) -> tuple[list[str], np.ndarray]:
  """Every (id, vector) of a collection, ordered by id."""
  client.load_collection(name)
  it = client.query_iterator(name, batch_size=batch, filter="",
                             output_fields=["id", "vector"])
  rows = []
  try:
    while True:
      page = it.next()
      if not page:
        break
      rows.extend((r["id"], r["vector"]) for r in page)
  finally:
    it.close()
  rows.sort(key=lambda r: r[0])
  if not rows:
    return [], np.zeros((0, 0), np.float32)
  return [r[0] for r in rows], np.asarray([r[1] for r in rows], np.float32)


def two_stage(client, full_name: str, small_name: str, q_full: np.ndarray,
              q_small: np.ndarray, k: int, candidates: int):
  """Candidates from the small-size collection, re-ranked by full-size inner product.

  Returns [[(id, score), ...] per query] (top k, best first; equal scores by id).
  """
  first = search(client, small_name, q_small, candidates)
  full = vectors_of(client, full_name, [i for row in first for i, _ in row])
  out = []
  for q, row in zip(q_full, first):
    ids = [i for i, _ in row if i in full]
    if not ids:
      out.append([])
      continue
    scores = np.stack([full[i] for i in ids]) @ q
    order = sorted(range(len(ids)), key=lambda j: (-scores[j], ids[j]))[:k]
    out.append([(ids[j], float(scores[j])) for j in order])
  return out


def recall_at_k(found, exact) -> float:
  """Mean over queries of |found top-k ∩ exact top-k| / |exact top-k|."""
  vals = [len(set(f) & set(e)) / len(e) for f, e in zip(found, exact) if len(e)]
  return float(np.mean(vals)) if vals else 0.0


def timed(fn, *args, **kw):
  """(result, seconds)."""
  start = time.perf_counter()
  result = fn(*args, **kw)
  return result, time.perf_counter() - start
