"""amos-eval sts|retrieval|grid and amos-index build|query|recall.

amos-eval sts       --model M --data PATH [--split test] [--layer L] [--dim D] [--pooling mean|cls]
amos-eval retrieval --model M --data BEIR_DIR [--split test] [--similarity cos|dot]
amos-eval grid      --model M --data PATH --task sts|retrieval [--compare M2] [--dims 32,64]
amos-index build    --model M --data CORPUS [--db PATH | --uri URL] [--collection NAME]
                    [--candidate-size L,D]
amos-index query    --model M --text TEXT [--text TEXT ...] [--top 10] [--candidate-size L,D]
amos-index recall   --model M --data BEIR_DIR|QUERIES.txt [--k 10] [--candidate-size L,D]

M is a training workdir (latest checkpoint), WORKDIR@STEP, or hf:PATH. Every command
prints a markdown table and writes it with a results JSON to --out (default: the
workdir's eval/ folder, or the current directory for hf:). Failures are one
`error:` line and exit status 2 (`amos_jax.cli.run_command`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from amos_jax.cli import run_command
from amos_jax.errors import ConfigError, DataError, one_line
from amos_jax.eval import metrics as metrics_lib


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one ConfigError line, like every other failure."""

  def error(self, message):
    raise ConfigError(f"{self.prog}: {message} (see {self.prog.split()[0]} --help)")


# ------------------------------------------------------------------- arguments
def _model_args(p: argparse.ArgumentParser, size: bool = True) -> None:
  p.add_argument("--model", required=True, help="WORKDIR, WORKDIR@STEP or hf:PATH")
  if size:
    p.add_argument("--layer", type=int, default=None, help="hidden state to pool "
                   "(default: the last layer; 0 = embeddings)")
    p.add_argument("--dim", type=int, default=None,
                   help="keep the first D dimensions, then re-normalize (default: all)")
  p.add_argument("--pooling", choices=("mean", "cls"), default=None,
                 help="default: what the model folder declares, else mean")
  p.add_argument("--max-len", type=int, default=None,
                 help="tokens per text, [CLS] and [SEP] included (default: the model's)")
  p.add_argument("--batch-tokens", type=int, default=16384,
                 help="padded tokens per embedding batch")
  p.add_argument("--out", default=None, help="results folder (default: WORKDIR/eval, "
                 "or the current directory for hf:)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pair(text: str | None, flag: str) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    l, d = (int(x) for x in text.split(","))
  except ValueError:
    raise ConfigError(f"{flag} {text!r}: give LAYER,DIM, e.g. {flag} 2,64") from None
  return l, d


def _load(args, ref: str | None = None):
  from amos_jax.eval.model import load_model
  return load_model(ref or args.model, pooling=args.pooling, max_len=args.max_len)


def _embed_kw(args) -> dict:
  if args.batch_tokens < 16:
    raise ConfigError(f"--batch-tokens {args.batch_tokens}: use at least 16")
  return dict(batch_tokens=args.batch_tokens, progress=not args.no_progress)


# --------------------------------------------------------------------- output
def markdown_table(rows: list[dict], columns: list[str], digits: int = 2) -> str:
  def cell(v):
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_results(out_dir: str, name: str, results: dict, table: str) -> str:
  """Writes OUT/name.json and OUT/name.md; prints the table. Returns the JSON path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print(f"results: {path}")
  return path


def _slug(path: str) -> str:
  base = os.path.basename(os.path.normpath(path)) or "data"
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def _size_tag(model, layer, dim) -> str:
  return f"l{layer}d{dim}-{model.pooling}"


def _header(model, layer=None, dim=None) -> dict:
  return dict(model=model.identity, layer=layer, dim=dim, pooling=model.pooling,
              max_len=model.max_len)


# ------------------------------------------------------------------ amos-eval
def _sts(args) -> int:
  from amos_jax.eval import sts
  from amos_jax.eval.model import check_size, embed
  sets = sts.load_sets(args.data, args.split)
  model = _load(args)
  layer, dim = check_size(model, args.layer, args.dim)
  rows = sts.evaluate_sets(sets, lambda texts: embed(model, texts, layer=layer, dim=dim,
                                                     **_embed_kw(args)))
  results = dict(task="sts", data=os.path.abspath(args.data), split=args.split,
                 **_header(model, layer, dim), results=rows)
  name = f"sts-{_slug(args.data)}-{args.split}-{_size_tag(model, layer, dim)}"
  write_results(args.out or model.ref.default_out, name, results,
                markdown_table(rows, ["set", "pairs", "spearman", "pearson"]))
  return 0


def _retrieval(args) -> int:
  from amos_jax.eval import retrieval
  from amos_jax.eval.model import check_size
  beir = retrieval.load_beir(args.data, args.split)
  model = _load(args)
  layer, dim = check_size(model, args.layer, args.dim)
  scores = retrieval.evaluate_sizes(model, beir, [(layer, dim)], similarity=args.similarity,
                                    **_embed_kw(args))[(layer, dim)]
  row = dict(set=beir.name, queries=len(beir.query_ids), documents=len(beir.doc_ids),
             **scores)
  results = dict(task="retrieval", data=os.path.abspath(args.data), split=args.split,
                 similarity=args.similarity, **_header(model, layer, dim), results=[row])
  name = f"retrieval-{_slug(args.data)}-{args.split}-{_size_tag(model, layer, dim)}"
  write_results(args.out or model.ref.default_out, name, results,
                markdown_table([row], ["set", "queries", "documents",
                                       *metrics_lib.RETRIEVAL_METRICS], digits=4))
  return 0


def _grid(args) -> int:
  from amos_jax.eval import grid, retrieval, sts
  if args.task == "sts":
    data = sts.load_sets(args.data, args.split)
    metric = "spearman"
  else:
    data = retrieval.load_beir(args.data, args.split)
    metric = args.metric
    metrics_lib.parse_metric(metric)
  panels = []
  for ref in [args.model] + ([args.compare] if args.compare else []):
    model = _load(args, ref)
    layers = list(range(1, model.num_layers + 1))
    dims = ([int(d) for d in args.dims.split(",")] if args.dims
            else grid.grid_dims(model.width))
    bad = [d for d in dims if not 1 <= d <= model.width]
    if bad:
      raise ConfigError(f"--dims {bad[0]} is outside {ref}: its width is {model.width}")
    if args.task == "sts":
      values = grid.sts_grid(model, data, layers, dims, **_embed_kw(args))
    else:
      values = grid.retrieval_grid(model, data, layers, dims, metric=metric,
                                   similarity=args.similarity, **_embed_kw(args))
    panels.append(dict(title=_short(model.identity), model=model.identity,
                       pooling=model.pooling, layers=layers, dims=dims,
                       values=values.tolist()))
  out = args.out or _load_ref(args.model).default_out
  os.makedirs(out, exist_ok=True)
  name = f"grid-{args.task}-{_slug(args.data)}-{args.split}"
  png = os.path.join(out, f"{name}.png")
  grid.plot(png, [dict(p, values=np.asarray(p["values"])) for p in panels],
            f"{metric} x100, {_slug(args.data)} {args.split}")
  tables = []
  for p in panels:
    rows = [dict(layer=l, **{str(d): p["values"][i][j] for j, d in enumerate(p["dims"])})
            for i, l in enumerate(p["layers"])]
    tables.append(f"{p['title']} ({metric} x100)\n\n" +
                  markdown_table(rows, ["layer"] + [str(d) for d in p["dims"]]))
  results = dict(task=f"grid-{args.task}", data=os.path.abspath(args.data), split=args.split,
                 metric=metric, png=png, panels=panels)
  write_results(out, name, results, "\n\n".join(tables))
  print(f"heatmap: {png}")
  return 0


def _short(identity: str) -> str:
  path = identity.removeprefix("hf:")
  parts = [p for p in path.split(os.sep) if p]
  return "/".join(parts[-2:]) if parts else identity


def _load_ref(ref: str):
  from amos_jax.eval.model import parse_model_ref
  return parse_model_ref(ref)


def eval_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="amos-eval", description="Evaluate an encoder: STS, retrieval, "
              "2D-Matryoshka grids.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  s = sub.add_parser("sts", help="Spearman/Pearson x100 of cosine vs gold (MTEB)")
  _model_args(s)
  s.add_argument("--data", required=True, help="STS-B, SICK or SemEval STS file or folder")
  s.add_argument("--split", default="test", choices=("train", "dev", "test"))
  r = sub.add_parser("retrieval", help="exact dense retrieval on a BEIR folder")
  _model_args(r)
  r.add_argument("--data", required=True, help="BEIR folder")
  r.add_argument("--split", default="test")
  r.add_argument("--similarity", default="cos", choices=("cos", "dot"))
  g = sub.add_parser("grid", help="the metric at every (layer, dim) size, as a heatmap")
  _model_args(g, size=False)
  g.add_argument("--data", required=True)
  g.add_argument("--task", required=True, choices=("sts", "retrieval"))
  g.add_argument("--split", default="test")
  g.add_argument("--compare", default=None, help="a second model, drawn side by side")
  g.add_argument("--dims", default=None, help="comma-separated dims (default: powers of "
                 "two from 32 up to the width, plus the width)")
  g.add_argument("--metric", default="ndcg@10", help="retrieval metric for the grid")
  g.add_argument("--similarity", default="cos", choices=("cos", "dot"))
  return p


def run_eval(argv=None) -> int:
  args = eval_parser().parse_args(argv)
  return {"sts": _sts, "retrieval": _retrieval, "grid": _grid}[args.command](args)


def eval_main(argv=None) -> int:
  return run_command(lambda: run_eval(argv))


# ----------------------------------------------------------------- amos-index
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
  from amos_jax.eval.model import check_size, embed_layers, truncate_normalize
  name = index.collection_name(args.collection)
  ids, texts = read_texts(args.data)
  model = _load(args)
  layer, dim = check_size(model, args.layer, args.dim)
  small = _pair(args.candidate_size, "--candidate-size")
  if small:
    small = check_size(model, *small)
  layers = sorted({layer} | ({small[0]} if small else set()))
  start = time.perf_counter()
  pooled = embed_layers(model, texts, layers, desc="corpus", **_embed_kw(args))
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
                 index=_index_where(args, model)[1], **_header(model, layer, dim),
                 embed_s=round(embed_s, 2), texts_per_s=round(len(texts) / embed_s, 1),
                 collections=rows)
  write_results(args.out or model.ref.default_out, f"index-build-{name}", results,
                markdown_table(rows, ["collection", "layer", "dim", "entities", "upserted",
                                      "insert_s"]))
  return 0


def _query_vectors(args, model, texts, layer, dim, small):
  from amos_jax.eval.model import embed_layers, truncate_normalize
  layers = sorted({layer} | ({small[0]} if small else set()))
  pooled = embed_layers(model, texts, layers, desc="queries", **_embed_kw(args))
  full = truncate_normalize(pooled[layers.index(layer)], dim)
  return full, (truncate_normalize(pooled[layers.index(small[0])], small[1])
                if small else None)


def _index_query(args) -> int:
  from amos_jax.eval import index
  from amos_jax.eval.model import check_size
  name = index.collection_name(args.collection)
  if not args.text:
    raise ConfigError("amos-index query needs --text TEXT (repeat it for more queries)")
  model = _load(args)
  layer, dim = check_size(model, args.layer, args.dim)
  small = _pair(args.candidate_size, "--candidate-size")
  small = check_size(model, *small) if small else None

  def run(client, where):
    index.require(client, name, _meta(model, layer, dim), where)
    if small:
      small_name = index.candidate_collection(name, *small)
      index.require(client, small_name, _meta(model, *small), where)
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
  results = dict(task="index-query", **_header(model, layer, dim), collection=name,
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
  from amos_jax.eval.model import check_size
  from amos_jax.eval.search import exact_search
  name = index.collection_name(args.collection)
  queries = read_queries(args.data)
  model = _load(args)
  layer, dim = check_size(model, args.layer, args.dim)
  small = _pair(args.candidate_size, "--candidate-size")
  small = check_size(model, *small) if small else None

  def run(client, where):
    index.require(client, name, _meta(model, layer, dim), where)
    if small:
      small_name = index.candidate_collection(name, *small)
      index.require(client, small_name, _meta(model, *small), where)
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
                 **_header(model, layer, dim), collection=name, documents=n_docs,
                 queries=len(queries), k=args.k, results=rows)
  write_results(args.out or model.ref.default_out, f"index-recall-{name}", results,
                markdown_table(rows, ["search", f"recall@{args.k}", "queries_per_s"],
                               digits=4))
  return 0


def index_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="amos-index", description="A Milvus index of a corpus: build, query, "
              "and recall against exact search.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  parsers = {}
  for cmd, helptext in (("build", "embed a corpus into a collection"),
                        ("query", "print the top hits of --text queries"),
                        ("recall", "recall@k of the index against exact search")):
    s = sub.add_parser(cmd, help=helptext)
    _model_args(s)
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
  return {"build": _index_build, "query": _index_query,
          "recall": _index_recall}[args.command](args)


def index_main(argv=None) -> int:
  return run_command(lambda: run_index(argv))


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "index":
    sys.exit(index_main(sys.argv[2:]))
  sys.exit(eval_main(sys.argv[1:]))
