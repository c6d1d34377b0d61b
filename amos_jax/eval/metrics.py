"""Evaluation metrics, defined as the field's reference tools define them.

STS (MTEB): Spearman and Pearson correlation between the gold scores and the cosine
similarity of the two embeddings, times 100.
Retrieval (BEIR, i.e. trec_eval through pytrec_eval, plus BEIR's own MRR):
  nDCG@k     sum_{i<=k} rel_i / log2(i+1) over the ideal ordering of the qrels
             (graded relevance, linear gain; 0 when no document is relevant)
  MRR@k      1 / rank of the first relevant document in the top k, else 0
  Recall@k   relevant documents in the top k / all relevant documents
  MAP@k      sum over relevant documents in the top k of precision at their rank,
             divided by all relevant documents
A document is relevant when its qrels grade is >= 1. Each is averaged over the
queries that have qrels. Rankings with equal scores are ordered by document id, so
the result never depends on hash or sort order.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from amos_jax.errors import ConfigError

RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100",
                     "map@100")


# ----------------------------------------------------------------------------- STS
def rank_data(a: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
  a = np.asarray(a, np.float64)
  order = np.argsort(a, kind="stable")
  sorted_a = a[order]
  # Boundaries of runs of equal values in the sorted array.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_a)) + 1]
  ends = np.r_[starts[1:], len(a)]
  ranks = np.empty(len(a), np.float64)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return ranks


def pearson(x, y) -> float:
  """Pearson's r of two (N,) vectors (nan when either is constant)."""
  x = np.asarray(x, np.float64) - np.mean(x)
  y = np.asarray(y, np.float64) - np.mean(y)
  denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
  if denom == 0.0:
    return float("nan")
  return float(np.clip(np.dot(x, y) / denom, -1.0, 1.0))


def spearman(x, y) -> float:
  """Spearman's rho: Pearson's r of the average ranks."""
  return pearson(rank_data(x), rank_data(y))


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity: (N, D), (N, D) -> (N,) float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
  nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
  return (a * b).sum(1) / (na * nb)


def sts_scores(gold, emb1: np.ndarray, emb2: np.ndarray) -> dict[str, float]:
  """MTEB's STS main scores: {'spearman', 'pearson'} of cosine vs gold, x100."""
  cos = cosine_pairs(emb1, emb2)
  return dict(spearman=100.0 * spearman(gold, cos), pearson=100.0 * pearson(gold, cos))


# ----------------------------------------------------------------------- retrieval
def rank_by_score(scores: Mapping[str, float], k: int | None = None) -> list[str]:
  """Document ids by descending score, equal scores by ascending id."""
  ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
  return [d for d, _ in ranked[:k]]


def parse_metric(name: str) -> tuple[str, int]:
  metric, _, k = name.partition("@")
  if metric not in ("ndcg", "mrr", "recall", "map", "precision") or not k.isdigit():
    raise ConfigError(f"unknown metric {name!r}; use e.g. ndcg@10, mrr@10, recall@100, "
                     "map@100")
  return metric, int(k)


def query_metrics(qrels: Mapping[str, int], ranking: Sequence[str],
                  metrics: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, float]:
  """The metrics of one ranked list against one query's graded qrels."""
  relevant = {d for d, g in qrels.items() if g >= 1}
  out = {}
  for name in metrics:
    metric, k = parse_metric(name)
    top = list(ranking[:k])
    hits = [d in relevant for d in top]
    if metric == "ndcg":
      gains = [max(qrels.get(d, 0), 0) for d in top]
      dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
      ideal = sorted((max(g, 0) for g in qrels.values()), reverse=True)[:k]
      idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
      out[name] = dcg / idcg if idcg > 0 else 0.0
    elif metric == "mrr":
      out[name] = next((1.0 / (i + 1) for i, h in enumerate(hits) if h), 0.0)
    elif metric == "recall":
      out[name] = sum(hits) / len(relevant) if relevant else 0.0
    elif metric == "precision":
      out[name] = sum(hits) / k
    else:  # map
      found, total = 0, 0.0
      for i, h in enumerate(hits):
        if h:
          found += 1
          total += found / (i + 1)
      out[name] = total / len(relevant) if relevant else 0.0
  return out


def retrieval_scores(qrels: Mapping[str, Mapping[str, int]],
                     rankings: Mapping[str, Sequence[str]],
                     metrics: Sequence[str] = RETRIEVAL_METRICS
                     ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(mean over the qrels' queries, per query) of each metric.

  rankings: {query id: document ids, best first}; a query without one scores 0.
  """
  per_query = {q: query_metrics(qrels[q], rankings.get(q, ()), metrics) for q in qrels}
  mean = {m: float(np.mean([s[m] for s in per_query.values()])) if per_query else 0.0
          for m in metrics}
  return mean, per_query


# ---------------------------------------------------------------------- GLUE
def accuracy(labels, predictions) -> float:
  """Fraction of predictions equal to the labels."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  return float(np.mean(labels == predictions)) if len(labels) else float("nan")


def binary_f1(labels, predictions, positive: int = 1) -> float:
  """F1 of the positive class: 2 TP / (2 TP + FP + FN) (0 when there is none)."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  tp = int(np.sum((predictions == positive) & (labels == positive)))
  fp = int(np.sum((predictions == positive) & (labels != positive)))
  fn = int(np.sum((predictions != positive) & (labels == positive)))
  return 2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(labels, predictions) -> float:
  """Matthews correlation, multi-class (Gorodkin's R_K, as scikit-learn computes it):
  (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)); 0 when undefined."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  classes = np.union1d(labels, predictions)
  t = np.array([np.sum(labels == k) for k in classes], np.float64)
  p = np.array([np.sum(predictions == k) for k in classes], np.float64)
  c = float(np.sum(labels == predictions))
  s = float(len(labels))
  denom = math.sqrt((s * s - float(p @ p)) * (s * s - float(t @ t)))
  return float((c * s - float(p @ t)) / denom) if denom > 0 else 0.0


def glue_scores(labels, outputs, regression: bool, num_labels: int = 2) -> dict[str, float]:
  """The GLUE figures x100: accuracy, MCC and (two labels) F1 of class 1 from argmax
  predictions; Pearson and Spearman for regression."""
  if regression:
    return dict(pearson=100.0 * pearson(labels, outputs),
                spearman=100.0 * spearman(labels, outputs))
  pred = np.asarray(outputs)
  pred = pred.argmax(-1) if pred.ndim == 2 else pred
  out = dict(accuracy=100.0 * accuracy(labels, pred))
  if num_labels == 2:
    out["f1"] = 100.0 * binary_f1(labels, pred)
  out["mcc"] = 100.0 * matthews_corrcoef(labels, pred)
  return out
