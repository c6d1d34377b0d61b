"""amos-eval on a training workdir: the model reference parser and loader give the
encoder's own embeddings, sizes and steps are honoured, grids and results files are
written, and bad input is one `error:` line."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax.eval import cli, metrics, retrieval
from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.model.heads import mean_pool

WORDS = ("cat dog bird fish tree rock sun moon red blue green small big fast slow "
         "runs eats sees the a on in under").split()
MODEL = dict(vocab_size=5 + len(WORDS) + 26, hidden_size=32, num_layers=2, num_heads=4,
             intermediate_size=64, embedding_size=16, max_position_embeddings=64,
             hidden_dropout=0.0, attention_dropout=0.0)


def _nested(flat) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(str(p), {})
    node[str(path[-1])] = value
  return tree


def _encoder_params(seed: int):
  enc = Encoder(EncoderConfig(**MODEL), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(enc, nnx.Param)
  # Non-trivial LayerNorms and biases, so a dropped or swapped tensor would show.
  keys = iter(jax.random.split(jax.random.key(seed), 256))
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), params)
  return graphdef, params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory as amos-train leaves it (config.json, tokenizer/, checkpoints/<step>/
  state with params under 'discriminator' beside a 'generator'), at steps 1 and 2."""
  import orbax.checkpoint as ocp
  root = tmp_path_factory.mktemp("run")
  os.makedirs(root / "tokenizer")
  (root / "tokenizer" / "vocab.txt").write_text(
      "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
                 *"abcdefghijklmnopqrstuvwxyz"]) + "\n")
  config = dict(model=MODEL, objective=dict(name="electra"), train=dict(seq_len=32),
                data=dict(tokenizer=""))
  (root / "config.json").write_text(json.dumps(config))
  models = {}
  for step in (1, 2):
    graphdef, params = _encoder_params(step)
    _, other = _encoder_params(10 + step)
    flat = {("discriminator",) + tuple(p): np.asarray(v[...])
            for p, v in nnx.to_flat_state(params)}
    flat.update({("generator",) + tuple(p): np.asarray(v[...])
                 for p, v in nnx.to_flat_state(other)})
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(root / "checkpoints" / str(step) / "state"),
              {"params": _nested(flat)})
    ckpt.wait_until_finished()
    models[step] = (graphdef, params)
  return str(root), models


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  rows = [f"{rng.uniform(0, 5):.2f}\t{_sentence(rng, rng.integers(2, 9))}\t"
          f"{_sentence(rng, rng.integers(2, 40))}" for _ in range(24)]
  rows.insert(5, "\tan unlabeled pair\tis skipped")
  path = tmp_path_factory.mktemp("sts") / "toy.test.tsv"
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def _our_embeddings(graphdef, params, vocab, texts, layer, dim):
  """The encoder run directly: [CLS] text [SEP], mean over tokens, first dim, unit."""
  from amos_jax.data.tokenizer import WordPieceTokenizer
  tok = WordPieceTokenizer(vocab)
  rows = [[tok.cls_id] + ids[:30] + [tok.sep_id] for ids, _ in tok.encode_batch(texts)]
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int32)
  seg = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, :len(r)], seg[i, :len(r)] = r, 1
  hidden = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(seg))
  e = np.asarray(mean_pool(hidden[layer], jnp.asarray(seg)))[:, :dim]
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def _run(capsys, *argv, main=cli.eval_main):
  rc = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _one_error_line(rc, err):
  assert rc == 2, err
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len([l for l in lines if l.startswith("error: ")]) == 1, err
  assert lines[-1].startswith("error: "), err
  return lines[-1]


@pytest.mark.parametrize("step,layer,dim", [(None, None, None), (1, 1, 8)])
def test_sts_on_a_workdir_equals_the_encoder_run_directly(tmp_path, capsys, workdir,
                                                          sts_file, step, layer, dim):
  path, models = workdir
  ref = path if step is None else f"{path}@{step}"
  argv = ["sts", "--model", ref, "--data", sts_file, "--out", tmp_path, "--no-progress"]
  argv += ["--layer", layer] if layer else []
  argv += ["--dim", dim] if dim else []
  rc, out, err = _run(capsys, *argv)
  assert rc == 0, err
  assert "| toy.test.tsv | 24 |" in out
  (result,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
  got = json.load(open(tmp_path / result))
  assert got["model"] == f"{path}@{step or 2}" and got["pooling"] == "mean"
  assert os.path.isfile(tmp_path / result.replace(".json", ".md"))

  lines = [l.split("\t") for l in open(sts_file).read().splitlines() if l[0] != "\t"]
  gold = np.array([float(l[0]) for l in lines])
  graphdef, params = models[step or 2]
  vocab = os.path.join(path, "tokenizer", "vocab.txt")
  e1 = _our_embeddings(graphdef, params, vocab, [l[1] for l in lines], layer or 2, dim or 32)
  e2 = _our_embeddings(graphdef, params, vocab, [l[2] for l in lines], layer or 2, dim or 32)
  want = metrics.sts_scores(gold, e1, e2)
  assert got["results"][0]["spearman"] == pytest.approx(want["spearman"], abs=1e-3)
  assert got["results"][0]["pearson"] == pytest.approx(want["pearson"], abs=1e-3)


def _beir(root, header=True, qrels=True):
  rng = np.random.default_rng(1)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "corpus.jsonl"), "w") as f:
    for i in range(30):
      f.write(json.dumps({"_id": f"d{i}", "title": _sentence(rng, 2),
                          "text": _sentence(rng, 12)}) + "\n")
  with open(os.path.join(root, "queries.jsonl"), "w") as f:
    for i in range(8):
      f.write(json.dumps({"_id": f"q{i}", "text": _sentence(rng, 4)}) + "\n")
  if qrels:
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    with open(os.path.join(root, "qrels", "test.tsv"), "w") as f:
      f.write("query-id\tcorpus-id\tscore\n" if header else "")
      for i in range(8):
        for j in rng.choice(30, 3, replace=False):
          f.write(f"q{i}\td{j}\t{rng.integers(0, 3)}\n")
  return root


def test_grid_writes_heatmap_and_matches_single_sizes(tmp_path, capsys, workdir, sts_file):
  path, _ = workdir
  rc, out, err = _run(capsys, "grid", "--model", path, "--compare", f"{path}@1", "--data",
                      sts_file, "--task", "sts", "--dims", "8,32", "--out", tmp_path,
                      "--no-progress")
  assert rc == 0, err
  (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
  grid = json.load(open(tmp_path / name))
  assert os.path.getsize(grid["png"]) > 1000 and grid["png"].endswith(".png")
  a, b = grid["panels"]
  assert a["layers"] == [1, 2] and a["dims"] == [8, 32]
  assert np.asarray(a["values"]).shape == (2, 2)
  # Cells equal `amos-eval sts` at that size (a small and the full size; both panels).
  for model, panel, i, j in ((path, a, 0, 0), (path, a, 1, 1), (f"{path}@1", b, 1, 1)):
    single = tmp_path / f"single{len(model)}{i}{j}"
    rc, _, err = _run(capsys, "sts", "--model", model, "--data", sts_file, "--layer",
                      panel["layers"][i], "--dim", panel["dims"][j], "--out", single,
                      "--no-progress")
    assert rc == 0, err
    (res,) = [f for f in os.listdir(single) if f.endswith(".json")]
    want = json.load(open(single / res))["results"][0]["spearman"]
    assert panel["values"][i][j] == pytest.approx(want, abs=1e-6)
  assert a["values"] != b["values"]

  # Retrieval grid: the full-size cell is `amos-eval retrieval`'s nDCG@10 (x100).
  beir = _beir(str(tmp_path / "beir"), header=False)
  rc, _, err = _run(capsys, "grid", "--model", path, "--data", beir, "--task", "retrieval",
                    "--dims", "16,32", "--out", tmp_path / "g2", "--no-progress")
  assert rc == 0, err
  rc, _, err = _run(capsys, "retrieval", "--model", path, "--data", beir, "--out",
                    tmp_path / "r", "--no-progress")
  assert rc == 0, err
  (g,) = [f for f in os.listdir(tmp_path / "g2") if f.endswith(".json")]
  (r,) = [f for f in os.listdir(tmp_path / "r") if f.endswith(".json")]
  cell = json.load(open(tmp_path / "g2" / g))["panels"][0]["values"][-1][-1]
  assert cell == pytest.approx(100 * json.load(open(tmp_path / "r" / r))["results"][0][
      "ndcg@10"], abs=1e-6)


def test_retrieval_leaves_out_the_query_itself_and_breaks_ties_by_id():
  beir = retrieval.BEIRSet("toy", ["a", "b", "c", "q1"], [""] * 4, ["q1", "q2"], ["", ""],
                           {"q1": {"a": 1}, "q2": {"b": 1}})
  corpus = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)  # a = b = q1
  queries = np.array([[1, 0], [1, 0]], np.float32)
  ranked = retrieval.rank(beir, queries, corpus, 3)
  assert ranked["q1"] == ["a", "b", "c"]          # its own document q1 never ranks
  assert ranked["q2"] == ["a", "b", "q1"]         # three equal scores: by id


def test_bad_input_is_one_error_line(tmp_path, capsys, workdir, sts_file):
  path, _ = workdir
  beir_no_qrels = _beir(str(tmp_path / "noq"), qrels=False)
  broken = tmp_path / "broken"
  os.makedirs(broken / "checkpoints" / "7" / "state")
  (broken / "checkpoints" / "7" / "state" / "_METADATA").write_text("not a checkpoint")
  (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  cases = {
      "missing file": ["sts", "--model", path, "--data", tmp_path / "nope.tsv"],
      "no qrels": ["retrieval", "--model", path, "--data", beir_no_qrels],
      "layer beyond": ["sts", "--model", path, "--data", sts_file, "--layer", 3],
      "dim beyond": ["sts", "--model", path, "--data", sts_file, "--dim", 33],
      "unreadable checkpoint": ["sts", "--model", broken, "--data", sts_file],
      "missing step": ["sts", "--model", f"{path}@5", "--data", sts_file],
      "not a workdir": ["sts", "--model", tmp_path, "--data", sts_file],
      "no hf folder": ["retrieval", "--model", f"hf:{tmp_path}/none", "--data", sts_file],
      "usage": ["sts", "--model", path],
      "grid dims": ["grid", "--model", path, "--data", sts_file, "--task", "sts",
                    "--dims", "64"],
  }
  messages = {}
  for what, argv in cases.items():
    rc, _, err = _run(capsys, *argv, "--out", tmp_path / "o")
    messages[what] = _one_error_line(rc, err)
  assert "nope.tsv" in messages["missing file"]
  assert "qrels" in messages["no qrels"]
  assert "--layer 3" in messages["layer beyond"] and "2 layers" in messages["layer beyond"]
  assert "--dim 33" in messages["dim beyond"] and "32" in messages["dim beyond"]
  assert "checkpoint" in messages["unreadable checkpoint"]
  assert "5" in messages["missing step"]


def test_a_corpus_matrix_on_disk_gives_the_same_scores(tmp_path, workdir):
  from amos_jax.eval.model import load_model
  path, _ = workdir
  beir = retrieval.load_beir(_beir(str(tmp_path / "beir")), "test")
  model = load_model(path)
  sizes = [(2, 32), (1, 16)]
  in_memory = retrieval.evaluate_sizes(model, beir, sizes, progress=False)
  on_disk = retrieval.evaluate_sizes(model, beir, sizes, progress=False, memory_bytes=0)
  assert in_memory == on_disk
