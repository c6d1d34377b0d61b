"""amos-index build|query|recall: the command line of `amos_jax/eval/index.py`.

amos-index build  --model M --data CORPUS [--db PATH | --uri URL] [--collection NAME]
                  [--candidate-size L,D] [--index-type AUTOINDEX]
amos-index query  --model M --text TEXT [--text TEXT ...] [--top 10] [--candidate-size L,D]
amos-index recall --model M --data BEIR_DIR|QUERIES.txt [--k 10] [--candidate-size L,D]

CORPUS: a BEIR folder or corpus.jsonl (ids from "_id"), or a text file (one document
per line, id = line number). The Milvus Lite file defaults to OUT/index.db, OUT being
--out or the model's default results folder.
"""
from __future__ import annotations

import json
import os
import time

from amos_jax import hostcpu
from amos_jax.errors import ConfigError, DataError, one_line
from amos_jax.eval.cli import (Parser, add_model_args, embed_options, load_model_arg,
                               markdown_table, parse_size, run_header, write_results)


def read_texts(data: str) -> tuple[list[str], list[str]]:
  """(ids, texts) of a BEIR folder / corpus.jsonl, or of a text file (id = line number,
  empty lines skipped)."""
  from amos_jax.eval.retrieval import read_corpus
  if os.path.isdir(data):
    return read_corpus(os.path.join(data, "corpus.jsonl"))
  if data.endswith(".jsonl"):
    return read_corpus(data)
  if not os.path.isfile(data):
    raise DataError(f"--data {data} not found; give a BEIR folder, a corpus.jsonl or a "
                    "text file with one document per line")
  try:
    with open(data, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except UnicodeDecodeError as e:
    raise DataError(f"{data} is not UTF-8 (byte {e.start})") from None
  pairs = [(str(i), t.strip()) for i, t in enumerate(lines) if t.strip()]
  if not pairs:
    raise DataError(f"{data} holds no text")
  return [i for i, _ in pairs], [t for _, t in pairs]


def read_queries(data: str) -> list[str]:
  """Query texts of a BEIR folder (queries.jsonl) or a text file (one per line)."""
  from amos_jax.eval.retrieval import _jsonl
  if os.path.isdir(data):
    return [r.get("text", "") for r in _jsonl(os.path.join(data, "queries.jsonl"))]
  return read_texts(data)[1]


def _index_where(args, model) -> tuple[str, str]:
  """(--db path or --uri, what to call it in messages)."""
  if args.uri:
    return None, args.uri
  db = args.db or os.path.join(args.out or model.ref.default_out, "index.db")
  return db, db


def _with_client(args, model, fn):
  from amos_jax.eval import index
  db, where = _index_where(args, model)
  if db is not None and args.command != "build" and not os.path.exists(db):
    raise DataError(f"no index at {db}; build one with amos-index build (or give --db)")
  client = index.connect(db=db, uri=args.uri, token=args.token)
  try:
    return fn(client, where)
  except Exception as e:  # noqa: BLE001 - server-side failures arrive as MilvusException
    if type(e).__module__.startswith("pymilvus"):
      raise DataError(f"Milvus at {where}: {one_line(str(e))[:300]}") from None
    raise
  finally:
    client.close()


def _meta(model, layer, dim, similarity="cos") -> dict:
  return dict(model=model.identity, layer=layer, dim=dim, pooling=model.pooling,
              similarity=similarity)


def _index_build(args) -> int:
  from amos_jax.eval import index
  from amos_jax.eval.model import embed_layers, truncate_normalize
  name = index.collection_name(args.collection)
  ids, texts = read_texts(args.data)
  model = load_model_arg(args)
  layer, dim, small = _sizes(args, model)
  layers = sorted({layer} | ({small[0]} if small else set()))
  start = time.perf_counter()
  pooled = embed_layers(model, texts, layers, desc="corpus", **embed_options(args))
  embed_s = time.perf_counter() - start
  targets = [(name, layer, dim)]
  if small:
    targets.append((index.candidate_collection(name, *small), *small))

  def build(client, where):
    rows = []
    for coll, l, d in targets:
      vectors = truncate_normalize(pooled[layers.index(l)], d)
      n, secs = index.timed(index.upsert, client, coll, ids, vectors, texts,
                            _meta(model, l, d), where, index_type=args.index_type)
      rows.append(dict(collection=coll, layer=l, dim=d, entities=n, upserted=len(ids),
                       insert_s=round(secs, 2)))
    return rows

  rows = _with_client(args, model, build)
  results = dict(task="index-build", data=os.path.abspath(args.data),
                 index=_index_where(args, model)[1], **run_header(model, layer, dim),
                 embed_s=round(embed_s, 2), texts_per_s=round(len(texts) / embed_s, 1),
                 collections=rows)
  write_results(args.out or model.ref.default_out, f"index-build-{name}", results,
                markdown_table(rows, ["collection", "layer", "dim", "entities", "upserted",
                                      "insert_s"]))
  return 0


def _query_vectors(args, model, texts, layer, dim, small):
  from amos_jax.eval.model import embed_layers, truncate_normalize
  layers = sorted({layer} | ({small[0]} if small else set()))
  pooled = embed_layers(model, texts, layers, desc="queries", **embed_options(args))
  full = truncate_normalize(pooled[layers.index(layer)], dim)
  return full, (truncate_normalize(pooled[layers.index(small[0])], small[1])
                if small else None)


def _sizes(args, model):
  """(layer, dim, candidate size or None), each checked against the model."""
  from amos_jax.eval.model import check_size
  layer, dim = check_size(model, args.layer, args.dim)
  small = parse_size(args.candidate_size, "--candidate-size")
  return layer, dim, (check_size(model, *small) if small else None)


def _require(index, client, name, model, layer, dim, small, where):
  """Refuses collections built with another model or size; the candidate
  collection's name (None without two-stage search)."""
  index.require(client, name, _meta(model, layer, dim), where)
  if not small:
    return None
  small_name = index.candidate_collection(name, *small)
  index.require(client, small_name, _meta(model, *small), where)
  return small_name


def _index_query(args) -> int:
  from amos_jax.eval import index
  name = index.collection_name(args.collection)
  if not args.text:
    raise ConfigError("amos-index query needs --text TEXT (repeat it for more queries)")
  model = load_model_arg(args)
  layer, dim, small = _sizes(args, model)

  def run(client, where):
    small_name = _require(index, client, name, model, layer, dim, small, where)
    q_full, q_small = _query_vectors(args, model, args.text, layer, dim, small)
    if small:
      hits = index.two_stage(client, name, small_name, q_full, q_small, args.top,
                             args.candidates)
    else:
      hits = index.search(client, name, q_full, args.top)
    texts = {}
    wanted = list({i for row in hits for i, *_ in row})
    for start in range(0, len(wanted), 1000):
      for r in client.get(name, ids=wanted[start:start + 1000], output_fields=["text"]):
        texts[r["id"]] = r.get("text", "")
    return [[dict(rank=k + 1, id=h[0], score=h[1], text=texts.get(h[0], ""))
             for k, h in enumerate(row)] for row in hits]

  hits = _with_client(args, model, run)
  for query, row in zip(args.text, hits):
    print(f"## {query}")
    print(markdown_table([dict(r, text=_snippet(r["text"])) for r in row],
                         ["rank", "score", "id", "text"], digits=4))
  results = dict(task="index-query", **run_header(model, layer, dim), collection=name,
                 queries=[dict(text=q, hits=row) for q, row in zip(args.text, hits)])
  out = args.out or model.ref.default_out
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"index-query-{name}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"results: {path}")
  return 0


def _snippet(text: str, n: int = 80) -> str:
  text = " ".join(text.split()).replace("|", "/")
  return text if len(text) <= n else text[:n - 3] + "..."


def _index_recall(args) -> int:
  from amos_jax.eval import index
  from amos_jax.eval.search import exact_search
  name = index.collection_name(args.collection)
  queries = read_queries(args.data)
  model = load_model_arg(args)
  layer, dim, small = _sizes(args, model)

  def run(client, where):
    small_name = _require(index, client, name, model, layer, dim, small, where)
    q_full, q_small = _query_vectors(args, model, queries, layer, dim, small)
    ids, corpus = index.all_vectors(client, name)
    (_, rows), exact_s = index.timed(exact_search, q_full, corpus, args.k)
    exact = [[ids[r] for r in row if r >= 0] for row in rows]
    index.search(client, name, q_full[:1], args.k)  # load and warm up outside the timing
    found, ann_s = index.timed(index.search, client, name, q_full, args.k)
    out = [dict(search=f"Milvus index, full size (layer {layer}, dim {dim})",
                **{f"recall@{args.k}": index.recall_at_k([[i for i, *_ in r] for r in found],
                                                         exact)},
                queries_per_s=round(len(queries) / ann_s, 1))]
    if small:
      index.two_stage(client, name, small_name, q_full[:1], q_small[:1], args.k,
                      args.candidates)
      found2, two_s = index.timed(index.two_stage, client, name, small_name, q_full,
                                  q_small, args.k, args.candidates)
      out.append(dict(search=f"two-stage: {args.candidates} candidates at layer "
                      f"{small[0]}, dim {small[1]}, re-ranked at full size",
                      **{f"recall@{args.k}": index.recall_at_k(
                          [[i for i, *_ in r] for r in found2], exact)},
                      queries_per_s=round(len(queries) / two_s, 1)))
    out.append(dict(search="exact (JAX matmul, this process)", **{f"recall@{args.k}": 1.0},
                    queries_per_s=round(len(queries) / exact_s, 1)))
    return out, len(ids)

  rows, n_docs = _with_client(args, model, run)
  results = dict(task="index-recall", data=os.path.abspath(args.data),
                 **run_header(model, layer, dim), collection=name, documents=n_docs,
                 queries=len(queries), k=args.k, results=rows)
  write_results(args.out or model.ref.default_out, f"index-recall-{name}", results,
                markdown_table(rows, ["search", f"recall@{args.k}", "queries_per_s"],
                               digits=4))
  return 0


def index_parser() -> argparse.ArgumentParser:
  p = Parser(prog="amos-index", description="A Milvus index of a corpus: build, query, "
              "and recall against exact search.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
  parsers = {}
  for cmd, helptext in (("build", "embed a corpus into a collection"),
                        ("query", "print the top hits of --text queries"),
                        ("recall", "recall@k of the index against exact search")):
    s = sub.add_parser(cmd, help=helptext)
    add_model_args(s)
    s.add_argument("--db", default=None, help="Milvus Lite file (default: OUT/index.db)")
    s.add_argument("--uri", default=None, help="a Milvus server, http://host:port")
    s.add_argument("--token", default=None, help="Milvus server token (user:password)")
    s.add_argument("--collection", default="corpus")
    s.add_argument("--candidate-size", default=None, help="L,D: two-stage search with a "
                   "small size's candidates re-ranked at full size")
    parsers[cmd] = s
  parsers["build"].add_argument("--data", required=True,
                                help="BEIR folder, corpus.jsonl, or a text file")
  parsers["build"].add_argument("--index-type", default="AUTOINDEX",
                                help="Milvus index type (default AUTOINDEX)")
  parsers["query"].add_argument("--text", action="append", default=[])
  parsers["query"].add_argument("--top", type=int, default=10)
  parsers["query"].add_argument("--candidates", type=int, default=100)
  parsers["recall"].add_argument("--data", required=True,
                                 help="queries: a BEIR folder or a text file")
  parsers["recall"].add_argument("--k", type=int, default=10)
  parsers["recall"].add_argument("--candidates", type=int, default=100)
  return p


def run_index(argv=None) -> int:
  args = index_parser().parse_args(argv)
  if args.db and args.uri:
    raise ConfigError("give --db (Milvus Lite) or --uri (a server), not both")
  limit = getattr(args, "top", None) or getattr(args, "k", None)
  if limit is not None and limit < 1:
    raise ConfigError(f"--top/--k {limit}: give at least 1")
  if args.candidate_size and limit and args.candidates < limit:
    raise ConfigError(f"--candidates {args.candidates} is below the {limit} hits asked "
                      "for; give at least as many candidates")
  hostcpu.split_host()
  return {"build": _index_build, "query": _index_query,
          "recall": _index_recall}[args.command](args)
