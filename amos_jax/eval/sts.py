"""Semantic textual similarity: readers for STS-B, SICK-R and SemEval STS 2012-16, and
MTEB's score (Spearman and Pearson x100 of the embeddings' cosine vs gold).

Files:
  STS-B     the original TSV: genre, file, year, id, score, s1, s2 [, extra fields
            ignored]; no header, no quote handling (raw '"' stays in the text)
  SICK      TSV with a header naming sentence_A, sentence_B, relatedness_score
  SemEval   `score<TAB>s1<TAB>s2`; an empty score marks an unlabeled pair (skipped)
`--data` may be one such file, or a folder: an STS-B folder (sts-<split>.csv), a
SICK folder (train -> SICK_train.txt, dev -> SICK_trial.txt, test ->
SICK_test_annotated.txt), or a folder of SemEval `*.<split>.tsv` files (searched one
level down too, so the sts12-16 folder gives every year).
"""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from amos_jax.errors import DataError
from amos_jax.eval.metrics import sts_scores

SICK_SPLITS = {"train": "SICK_train.txt", "dev": "SICK_trial.txt",
               "test": "SICK_test_annotated.txt"}


@dataclasses.dataclass
class STSSet:
  """Sentence pairs with gold scores: name, s1, s2 (N,), gold (N,) float64."""
  name: str
  s1: list[str]
  s2: list[str]
  gold: np.ndarray


def _lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f"{path} not found; give an STS-B, SICK or SemEval STS file or folder")
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") \
        from None
  return [l.rstrip("\r") for l in text.split("\n") if l.strip()]


def _score(text: str, path: str, line: int) -> float:
  try:
    return float(text)
  except ValueError:
    raise DataError(f"{path}:{line}: score {text!r} is not a number") from None


def read_stsb(path: str) -> STSSet:
  s1, s2, gold = [], [], []
  for n, line in enumerate(_lines(path), 1):
    f = line.split("\t")
    if len(f) < 7:
      raise DataError(f"{path}:{n}: {len(f)} tab-separated fields; STS-B rows have 7 "
                      "(genre, file, year, id, score, s1, s2)")
    gold.append(_score(f[4], path, n))
    s1.append(f[5])
    s2.append(f[6])
  return STSSet(os.path.basename(path), s1, s2, np.asarray(gold))


def read_sick(path: str) -> STSSet:
  lines = _lines(path)
  header = lines[0].split("\t") if lines else []
  try:
    a, b, r = (header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score"))
  except ValueError:
    raise DataError(f"{path}: the header must name sentence_A, sentence_B and "
                    "relatedness_score (SICK layout)") from None
  s1, s2, gold = [], [], []
  for n, line in enumerate(lines[1:], 2):
    f = line.split("\t")
    if len(f) <= max(a, b, r):
      raise DataError(f"{path}:{n}: {len(f)} fields, the header has {len(header)}")
    gold.append(_score(f[r], path, n))
    s1.append(f[a])
    s2.append(f[b])
  return STSSet(os.path.basename(path), s1, s2, np.asarray(gold))


def read_semeval(path: str) -> STSSet:
  s1, s2, gold = [], [], []
  for n, line in enumerate(_lines(path), 1):
    f = line.split("\t")
    if len(f) < 3:
      raise DataError(f"{path}:{n}: {len(f)} fields; SemEval STS rows are "
                      "score<TAB>s1<TAB>s2")
    if not f[0].strip():
      continue  # unlabeled pair
    gold.append(_score(f[0], path, n))
    s1.append(f[1])
    s2.append(f[2])
  return STSSet(os.path.basename(path), s1, s2, np.asarray(gold))


def read_file(path: str) -> STSSet:
  """One file, its layout recognized from its first line."""
  lines = _lines(path)
  if not lines:
    raise DataError(f"{path} is empty")
  first = lines[0].split("\t")
  if "sentence_A" in first:
    return read_sick(path)
  if len(first) >= 7:
    return read_stsb(path)
  return read_semeval(path)


def find_files(data: str, split: str) -> list[str]:
  """The files `--data` names for `split`."""
  if os.path.isfile(data):
    return [data]
  if not os.path.isdir(data):
    raise DataError(f"--data {data} not found; give an STS-B, SICK or SemEval STS file "
                    "or folder")
  stsb = os.path.join(data, f"sts-{split}.csv")
  if os.path.isfile(stsb):
    return [stsb]
  if split in SICK_SPLITS and os.path.isfile(os.path.join(data, SICK_SPLITS[split])):
    return [os.path.join(data, SICK_SPLITS[split])]
  files = sorted(glob.glob(os.path.join(data, f"*.{split}.tsv")))
  if not files:
    # A folder of years (sts12-16): each year's files; 'all/' only repeats them.
    files = sorted(f for f in glob.glob(os.path.join(data, "*", f"*.{split}.tsv"))
                   if os.path.basename(os.path.dirname(f)) != "all")
  if not files:
    raise DataError(f"{data} holds no {split} split (sts-{split}.csv, SICK files or "
                    f"*.{split}.tsv); pick --split or another folder")
  return files


def load_sets(data: str, split: str = "test") -> list[STSSet]:
  sets = []
  root = data if os.path.isdir(data) else os.path.dirname(data)
  for path in find_files(data, split):
    s = read_file(path)
    s.name = os.path.relpath(path, root)
    if len(s.gold) < 2:
      raise DataError(f"{path} has {len(s.gold)} labeled pairs; a correlation needs 2")
    sets.append(s)
  return sets


def evaluate_sets(sets: list[STSSet], embed_fn) -> list[dict]:
  """Rows {set, pairs, spearman, pearson} per set; with several sets also 'all'
  (every pair pooled) and 'mean' (average of the sets).

  embed_fn: list of texts -> (N, D) embeddings (unit length or not).
  """
  texts = sorted({t for s in sets for t in s.s1 + s.s2})
  emb = embed_fn(texts)
  where = {t: i for i, t in enumerate(texts)}
  rows = []
  pooled_gold, pooled_cos = [], []
  for s in sets:
    e1 = emb[[where[t] for t in s.s1]]
    e2 = emb[[where[t] for t in s.s2]]
    rows.append(dict(set=s.name, pairs=len(s.gold), **sts_scores(s.gold, e1, e2)))
    pooled_gold.append(s.gold)
    pooled_cos.append((e1, e2))
  if len(sets) > 1:
    per_set = list(rows)
    all_scores = sts_scores(np.concatenate(pooled_gold),
                            np.concatenate([a for a, _ in pooled_cos]),
                            np.concatenate([b for _, b in pooled_cos]))
    pairs = int(sum(len(s.gold) for s in sets))
    rows.append(dict(set="all", pairs=pairs, **all_scores))
    rows.append(dict(set="mean", pairs=pairs,
                     spearman=float(np.mean([r["spearman"] for r in per_set])),
                     pearson=float(np.mean([r["pearson"] for r in per_set]))))
  return rows
