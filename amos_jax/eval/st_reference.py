"""Our STS and retrieval figures beside sentence-transformers' in one run.

python -m amos_jax.eval.st_reference --model hf:PATH --data ../shared/data --out DIR

For a sentence-transformers folder (e.g. the imported all-MiniLM-L6-v2): STS-B dev,
SICK-R test, STS12-16 (each year: all pairs pooled, and the mean over its sets) and
SciFact test nDCG@10. Both columns use the same readers, metric code and tie-break;
only the embeddings differ (our JAX encoder vs `SentenceTransformer.encode`), so the
difference is the import's. Needs the test extra (torch, sentence-transformers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from amos_jax.eval import retrieval, sts
from amos_jax.cli import run_command
from amos_jax.eval.cli import markdown_table
from amos_jax.eval.metrics import retrieval_scores
from amos_jax.eval.model import embed, load_model

STS_SETS = [("STS-B dev", "stsbenchmark", "dev"), ("SICK-R test", "sick2014", "test"),
            *[(f"STS{y - 2000} (all / mean)", f"sts12-16/{y}", "test")
              for y in range(2012, 2017)]]


def _st_embed(st, texts):
  return st.encode(list(texts), batch_size=64, normalize_embeddings=True,
                   convert_to_numpy=True, show_progress_bar=False)


def run(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m amos_jax.eval.st_reference")
  p.add_argument("--model", required=True, help="hf:PATH of a sentence-transformers folder")
  p.add_argument("--data", required=True, help="folder holding stsbenchmark, sick2014, ...")
  p.add_argument("--out", default=".")
  p.add_argument("--skip-retrieval", action="store_true")
  a = p.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from sentence_transformers import SentenceTransformer
  model = load_model(a.model)
  st = SentenceTransformer(model.ref.path, device="cpu")
  rows = []

  def record(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  for label, folder, split in STS_SETS:
    sets = sts.load_sets(os.path.join(a.data, folder), split)
    t0 = time.perf_counter()
    ours = sts.evaluate_sets(sets, lambda t: embed(model, t, progress=False))
    t1 = time.perf_counter()
    theirs = sts.evaluate_sets(sets, lambda t: _st_embed(st, t))
    t2 = time.perf_counter()
    pick = [0] if len(ours) == 1 else [-2, -1]  # one set, or 'all' and 'mean'
    record(dict(task=label, metric="Spearman x100",
                amos_eval=" / ".join(f"{ours[i]['spearman']:.2f}" for i in pick),
                sentence_transformers=" / ".join(f"{theirs[i]['spearman']:.2f}" for i in pick),
                pairs=ours[pick[0]]["pairs"], amos_s=round(t1 - t0, 1),
                st_s=round(t2 - t1, 1)))

  if not a.skip_retrieval:
    beir = retrieval.load_beir(os.path.join(a.data, "scifact"), "test")
    t0 = time.perf_counter()
    ours = retrieval.evaluate_sizes(model, beir, [(model.num_layers, model.width)],
                                    progress=False)[(model.num_layers, model.width)]
    t1 = time.perf_counter()
    q, c = _st_embed(st, beir.query_texts), _st_embed(st, beir.doc_texts)
    theirs, _ = retrieval_scores(beir.qrels, retrieval.rank(beir, q, c, 100))
    t2 = time.perf_counter()
    for m in ("ndcg@10", "recall@100"):
      record(dict(task="SciFact test", metric=m, amos_eval=f"{100 * ours[m]:.2f}",
                  sentence_transformers=f"{100 * theirs[m]:.2f}", pairs=len(beir.query_ids),
                  amos_s=round(t1 - t0, 1), st_s=round(t2 - t1, 1)))

  table = markdown_table(rows, ["task", "metric", "amos_eval", "sentence_transformers",
                                "pairs", "amos_s", "st_s"])
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "st_reference.json"), "w") as f:
    json.dump(dict(model=model.identity, rows=rows), f, indent=2)
  with open(os.path.join(a.out, "st_reference.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(run_command(lambda: run(sys.argv[1:])))
