"""Evaluation metrics equal the reference tools: scipy.stats for STS correlations, ranx
(trec_eval's definitions) for nDCG/MRR/Recall/MAP with graded qrels and ties, and a
hand-worked example."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from amos_jax.eval import metrics


@pytest.mark.parametrize("n,ties", [(2, False), (17, False), (200, True), (500, True)])
def test_spearman_and_pearson_equal_scipy(n, ties):
  rng = np.random.default_rng(n)
  x = rng.normal(size=n)
  y = 0.5 * x + rng.normal(size=n)
  if ties:  # gold scores on a 0-5 grid, as STS has: many ties
    x = np.round(np.clip(x + 2.5, 0, 5) * 5) / 5
    y = np.round(y, 1)
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
  np.testing.assert_allclose(metrics.rank_data(x), stats.rankdata(x), atol=0)


def test_sts_scores_hand_worked():
  # Ranks 1 2 3 4 vs 1 3 2 4: rho = 1 - 6 * (1 + 1) / (4 * 15) = 0.8.
  gold = np.array([1.0, 2.0, 3.0, 4.0])
  angles = np.array([0.9, 0.3, 0.5, 0.1])  # cosines cos(a): ranks 1 3 2 4 by similarity
  e1 = np.stack([np.ones(4), np.zeros(4)], 1)
  e2 = np.stack([np.cos(angles), np.sin(angles)], 1)
  got = metrics.sts_scores(gold, e1, e2)
  assert got["spearman"] == pytest.approx(80.0)
  cos = np.cos(angles)
  assert got["pearson"] == pytest.approx(100 * stats.pearsonr(gold, cos).statistic)


def test_retrieval_hand_worked():
  qrels = {"q": {"d1": 2, "d2": 1, "d3": 0}}
  ranking = {"q": ["d3", "d1", "d4", "d2"]}
  mean, per_query = metrics.retrieval_scores(qrels, ranking)
  dcg = 2 / math.log2(3) + 1 / math.log2(5)      # d1 at rank 2, d2 at rank 4
  idcg = 2 / math.log2(2) + 1 / math.log2(3)     # d1, then d2
  assert mean["ndcg@10"] == pytest.approx(dcg / idcg)
  assert mean["ndcg@10"] == pytest.approx(0.6433224, abs=1e-7)
  assert mean["mrr@10"] == pytest.approx(0.5)    # the first relevant is at rank 2
  assert mean["recall@1"] == 0.0
  assert mean["recall@10"] == 1.0
  assert mean["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)
  # A query with nothing retrieved scores 0 and still counts in the mean.
  mean2, _ = metrics.retrieval_scores({**qrels, "q2": {"d9": 1}}, ranking)
  assert mean2["mrr@10"] == pytest.approx(0.25)


def test_ties_are_broken_by_document_id():
  assert metrics.rank_by_score({"b": 0.5, "a": 0.5, "c": 0.9, "aa": 0.5}) == \
      ["c", "a", "aa", "b"]
  # The tie decides the metric: with d1 first, MRR is 1.
  ranking = metrics.rank_by_score({"d2": 1.0, "d1": 1.0})
  assert metrics.query_metrics({"d1": 1}, ranking, ("mrr@10",))["mrr@10"] == 1.0


def _random_case(seed: int):
  rng = np.random.default_rng(seed)
  docs = [f"d{i:03d}" for i in range(150)]
  qrels, scores = {}, {}
  for q in range(40):
    judged = rng.choice(len(docs), size=rng.integers(1, 12), replace=False)
    grades = rng.integers(0, 4, size=len(judged))  # graded, zeros included
    if q % 7 == 0:
      grades[:] = 0  # a query with judgements but nothing relevant
    qrels[f"q{q}"] = {docs[j]: int(g) for j, g in zip(judged, grades)}
    retrieved = rng.choice(len(docs), size=rng.integers(5, 140), replace=False)
    # One decimal: many equal scores, so the tie-break matters.
    scores[f"q{q}"] = {docs[j]: float(np.round(rng.random(), 1)) for j in retrieved}
  return qrels, scores


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_equal_ranx(seed):
  import ranx
  qrels, scores = _random_case(seed)
  rankings = {q: metrics.rank_by_score(s) for q, s in scores.items()}
  ours, _ = metrics.retrieval_scores(qrels, rankings)
  # ranx sorts by score alone; give it our tie-broken order as distinct scores.
  run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in rankings.items()}
  names = list(metrics.RETRIEVAL_METRICS)
  theirs = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), names, make_comparable=True)
  for name in names:
    assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-9), name
