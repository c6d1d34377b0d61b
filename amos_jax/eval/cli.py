"""amos-eval sts|retrieval|grid|glue and amos-index build|query|recall.

amos-eval sts       --model M --data PATH [--split test] [--layer L] [--dim D] [--pooling mean|cls]
amos-eval retrieval --model M --data BEIR_DIR [--split test] [--similarity cos|dot]
amos-eval grid      --model M --data PATH --task sts|retrieval [--compare M2] [--dims 32,64]
amos-eval glue      --model M --task DIR [--seeds 1,2,3] [--config.KEY=VALUE ...]
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
import tempfile

import numpy as np

from amos_jax import hostcpu, paths
from amos_jax.cli import from_command_line, run_command
from amos_jax.errors import ConfigError
from amos_jax.eval import metrics as metrics_lib


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one ConfigError line, like every other failure."""

  def error(self, message):
    raise ConfigError(f"{self.prog}: {message} (see {self.prog.split()[0]} --help)")


# ------------------------------------------------------------------- arguments
def add_model_args(p: argparse.ArgumentParser, size: bool = True) -> None:
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


def parse_size(text: str | None, flag: str) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    l, d = (int(x) for x in text.split(","))
  except ValueError:
    raise ConfigError(f"{flag} {text!r}: give LAYER,DIM, e.g. {flag} 2,64") from None
  return l, d


def load_model_arg(args, ref: str | None = None):
  from amos_jax.eval.model import load_model
  return load_model(ref or args.model, pooling=args.pooling, max_len=args.max_len)


def embed_options(args) -> dict:
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
  paths.makedirs(out_dir)  # a gs:// workdir's eval/ too
  path = paths.join(out_dir, f"{name}.json")
  paths.write_atomic(path, json.dumps(results, indent=2))
  paths.write_atomic(paths.join(out_dir, f"{name}.md"), table + "\n")
  print(table)
  print(f"results: {path}")
  return path


def _slug(path: str) -> str:
  base = os.path.basename(os.path.normpath(path)) or "data"
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def _size_tag(model, layer, dim) -> str:
  return f"l{layer}d{dim}-{model.pooling}"


def run_header(model, layer=None, dim=None) -> dict:
  return dict(model=model.identity, layer=layer, dim=dim, pooling=model.pooling,
              max_len=model.max_len)


# ------------------------------------------------------------------ amos-eval
def _sts(args) -> int:
  from amos_jax.eval import sts
  from amos_jax.eval.model import check_size, embed
  sets = sts.load_sets(args.data, args.split)
  model = load_model_arg(args)
  layer, dim = check_size(model, args.layer, args.dim)
  rows = sts.evaluate_sets(sets, lambda texts: embed(model, texts, layer=layer, dim=dim,
                                                     **embed_options(args)))
  results = dict(task="sts", data=os.path.abspath(args.data), split=args.split,
                 **run_header(model, layer, dim), results=rows)
  name = f"sts-{_slug(args.data)}-{args.split}-{_size_tag(model, layer, dim)}"
  write_results(args.out or model.ref.default_out, name, results,
                markdown_table(rows, ["set", "pairs", "spearman", "pearson"]))
  return 0


def _retrieval(args) -> int:
  from amos_jax.eval import retrieval
  from amos_jax.eval.model import check_size
  beir = retrieval.load_beir(args.data, args.split)
  model = load_model_arg(args)
  layer, dim = check_size(model, args.layer, args.dim)
  scores = retrieval.evaluate_sizes(model, beir, [(layer, dim)], similarity=args.similarity,
                                    **embed_options(args))[(layer, dim)]
  row = dict(set=beir.name, queries=len(beir.query_ids), documents=len(beir.doc_ids),
             **scores)
  results = dict(task="retrieval", data=os.path.abspath(args.data), split=args.split,
                 similarity=args.similarity, **run_header(model, layer, dim),
                 results=[row])
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
    model = load_model_arg(args, ref)
    layers = list(range(1, model.num_layers + 1))
    dims = ([int(d) for d in args.dims.split(",")] if args.dims
            else grid.grid_dims(model.width))
    bad = [d for d in dims if not 1 <= d <= model.width]
    if bad:
      raise ConfigError(f"--dims {bad[0]} is outside {ref}: its width is {model.width}")
    if args.task == "sts":
      values = grid.sts_grid(model, data, layers, dims, **embed_options(args))
    else:
      values = grid.retrieval_grid(model, data, layers, dims, metric=metric,
                                   similarity=args.similarity, **embed_options(args))
    panels.append(dict(title=_short(model.identity), model=model.identity,
                       pooling=model.pooling, layers=layers, dims=dims,
                       values=values.tolist()))
  out = args.out or _load_ref(args.model).default_out
  paths.makedirs(out)
  name = f"grid-{args.task}-{_slug(args.data)}-{args.split}"
  png = paths.join(out, f"{name}.png")
  with tempfile.TemporaryDirectory() as local:  # matplotlib writes local files
    grid.plot(os.path.join(local, "grid.png"),
              [dict(p, values=np.asarray(p["values"])) for p in panels],
              f"{metric} x100, {_slug(args.data)} {args.split}")
    paths.copy_file(os.path.join(local, "grid.png"), png)
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
  p = Parser(prog="amos-eval", description="Evaluate an encoder: STS, retrieval, "
              "2D-Matryoshka grids.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
  s = sub.add_parser("sts", help="Spearman/Pearson x100 of cosine vs gold (MTEB)")
  add_model_args(s)
  s.add_argument("--data", required=True, help="STS-B, SICK or SemEval STS file or folder")
  s.add_argument("--split", default="test", choices=("train", "dev", "test"))
  r = sub.add_parser("retrieval", help="exact dense retrieval on a BEIR folder")
  add_model_args(r)
  r.add_argument("--data", required=True, help="BEIR folder")
  r.add_argument("--split", default="test")
  r.add_argument("--similarity", default="cos", choices=("cos", "dot"))
  g = sub.add_parser("grid", help="the metric at every (layer, dim) size, as a heatmap")
  add_model_args(g, size=False)
  g.add_argument("--data", required=True)
  g.add_argument("--task", required=True, choices=("sts", "retrieval"))
  g.add_argument("--split", default="test")
  g.add_argument("--compare", default=None, help="a second model, drawn side by side")
  g.add_argument("--dims", default=None, help="comma-separated dims (default: powers of "
                 "two from 32 up to the width, plus the width)")
  g.add_argument("--metric", default="ndcg@10", help="retrieval metric for the grid")
  g.add_argument("--similarity", default="cos", choices=("cos", "dot"))
  from amos_jax.eval import glue
  glue.add_parser(sub)
  return p


def run_eval(argv=None) -> int:
  from amos_jax.cli import split_config_overrides
  from amos_jax.eval import glue
  argv, overrides = split_config_overrides(list(sys.argv[1:] if argv is None else argv))
  args = eval_parser().parse_args(argv)
  if overrides and args.command != "glue":
    raise ConfigError(f"--config.{overrides[0][0]}: --config.KEY=VALUE applies to "
                      "amos-eval glue only")
  args.overrides = overrides
  # Fine-tuning trains: one device unless asked for more, as amos-train.
  hostcpu.split_host(1 if args.command == "glue" else None)
  return {"sts": _sts, "retrieval": _retrieval, "grid": _grid,
          "glue": glue.command}[args.command](args)


def eval_main(argv=None) -> int:
  argv = from_command_line(argv)
  return run_command(lambda: run_eval(argv))


# ----------------------------------------------------------------- amos-index
def index_main(argv=None) -> int:
  """amos-index build|query|recall (amos_jax/eval/index_cli.py)."""
  argv = from_command_line(argv)
  from amos_jax.eval.index_cli import run_index
  return run_command(lambda: run_index(argv))


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "index":
    sys.exit(index_main(sys.argv[2:]))
  sys.exit(eval_main(sys.argv[1:]))
