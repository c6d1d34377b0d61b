"""GLUE-layout classification / regression tasks: a folder with train.tsv and dev.tsv
(test.tsv optional), each tab-separated with a header row, no quote handling.

  data.task=DIR              the folder
  data.text_columns="a,b"    one column (single sentence) or two (a pair); '' finds
                             the first of DEFAULT_TEXT_COLUMNS in the header
  data.label_column="label"  the label's column; '' tries DEFAULT_LABEL_COLUMNS

Labels come from train.tsv: when every label is a number and some is not an
integer (STS-B's 3.800) the task is regression (one output, float32 labels); else
classification, the sorted unique label strings numbered 0..C-1. Rows are
[CLS] a [SEP] (b [SEP]) with token_type_ids 0 then 1, truncated longest-first and
padded to train.seq_len. The training batch of step s is a function of (seed, s)
alone (a fresh permutation each epoch, like `data/sequences.SequenceBatches`), so a
resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from amos_jax.errors import DataError

DEFAULT_TEXT_COLUMNS = (
    ("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
    ("premise", "hypothesis"), ("#1 String", "#2 String"), ("sentence",), ("text",))
DEFAULT_LABEL_COLUMNS = ("label", "Quality", "gold_label", "score")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass
class TaskSplit:
  """One split: texts (one list per text column) and raw label strings."""
  texts: list[list[str]]
  labels: list[str]
  skipped: int = 0


@dataclasses.dataclass
class Task:
  name: str
  directory: str
  text_columns: tuple[str, ...]
  label_column: str
  label_names: list[str]          # [] for regression
  splits: dict[str, TaskSplit]

  @property
  def regression(self) -> bool:
    return not self.label_names

  @property
  def num_labels(self) -> int:
    return 1 if self.regression else len(self.label_names)

  def label_values(self, split: str) -> np.ndarray:
    """(N,) float32 targets for regression, int32 class ids otherwise."""
    labels = self.splits[split].labels
    if self.regression:
      return np.asarray([float(x) for x in labels], np.float32)
    index = {name: i for i, name in enumerate(self.label_names)}
    unknown = sorted({x for x in labels if x not in index})
    if unknown:
      raise DataError(f"{self.directory}/{split}.tsv has labels not in train.tsv "
                      f"({', '.join(unknown[:3])}); the label set comes from train.tsv")
    return np.asarray([index[x] for x in labels], np.int32)


def _read_tsv(path: str) -> tuple[list[str], list[list[str]]]:
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise DataError(f"{path} is not UTF-8 text; give a tab-separated file") from None
  except OSError as e:
    raise DataError(f"cannot read {path} ({e.strerror or e})") from None
  lines = [l.rstrip("\r") for l in text.lstrip("\ufeff").split("\n")]
  lines = [l for l in lines if l.strip()]
  if not lines:
    raise DataError(f"{path} is empty; a GLUE-layout file has a header row and rows")
  return lines[0].split("\t"), [l.split("\t") for l in lines[1:]]


def _pick_text_columns(header: list[str], spec: str, path: str) -> tuple[str, ...]:
  if spec:
    cols = tuple(c.strip() for c in spec.split(",") if c.strip())
    if not 1 <= len(cols) <= 2:
      raise DataError(f"data.text_columns={spec!r}: give one column or two (a pair)")
    missing = [c for c in cols if c not in header]
    if missing:
      raise DataError(f"{path} has no column {missing[0]!r} (data.text_columns); its "
                      f"header is {', '.join(header)}")
    return cols
  for cols in DEFAULT_TEXT_COLUMNS:
    if all(c in header for c in cols):
      return cols
  raise DataError(f"{path}: no text column found in its header ({', '.join(header)}); "
                  "set --config.data.text_columns=COL or COL1,COL2")


def _pick_label_column(header: list[str], spec: str, path: str) -> str:
  if spec:
    if spec not in header:
      raise DataError(f"{path} has no label column {spec!r} (data.label_column); its "
                      f"header is {', '.join(header)}")
    return spec
  for col in DEFAULT_LABEL_COLUMNS:
    if col in header:
      return col
  raise DataError(f"{path} has no label column ({' or '.join(DEFAULT_LABEL_COLUMNS)}) in "
                  f"its header ({', '.join(header)}); set --config.data.label_column=COL")


def _read_split(path: str, text_columns, label_column, need_label: bool) -> TaskSplit:
  header, rows = _read_tsv(path)
  for c in text_columns:
    if c not in header:
      raise DataError(f"{path} has no column {c!r}; its header is {', '.join(header)}")
  has_label = label_column in header
  if need_label and not has_label:
    raise DataError(f"{path} has no label column {label_column!r}; its header is "
                    f"{', '.join(header)}")
  idx = [header.index(c) for c in text_columns]
  li = header.index(label_column) if has_label else None
  texts, labels, skipped = [[] for _ in idx], [], 0
  width = max(idx + ([li] if li is not None else []))
  for row in rows:
    if len(row) <= width or (li is not None and not row[li].strip()):
      skipped += 1  # a short row, or an unlabeled one
      continue
    for out, i in zip(texts, idx):
      out.append(row[i])
    labels.append(row[li].strip() if li is not None else "")
  if not labels:
    raise DataError(f"{path} holds no usable rows (header {', '.join(header)})")
  return TaskSplit(texts, labels, skipped)


def _is_regression(labels: list[str]) -> bool:
  try:
    values = [float(x) for x in labels]
  except ValueError:
    return False
  return any(v != int(v) for v in values) or any(("." in x or "e" in x.lower())
                                                 for x in labels)


def load_task(directory: str, text_columns: str = "", label_column: str = "",
              splits=("train", "dev")) -> Task:
  """Reads a GLUE-layout folder; every failure is one DataError line."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise DataError(f"data.task={directory}: no such folder; give a folder with "
                    "train.tsv and dev.tsv")
  for split in splits:
    if not os.path.isfile(os.path.join(directory, f"{split}.tsv")):
      raise DataError(f"{directory} has no {split}.tsv; a GLUE-layout task folder holds "
                      "train.tsv and dev.tsv (with a header row)")
  train_path = os.path.join(directory, "train.tsv")
  header, _ = _read_tsv(train_path)
  cols = _pick_text_columns(header, text_columns, train_path)
  label = _pick_label_column(header, label_column, train_path)
  out = {}
  for split in splits:
    out[split] = _read_split(os.path.join(directory, f"{split}.tsv"), cols, label,
                             need_label=split != "test")
  names = [] if _is_regression(out["train"].labels) else sorted(set(out["train"].labels))
  if len(names) == 1:
    raise DataError(f"{train_path}: every row has label {names[0]!r}; a classification "
                    "task needs at least two")
  return Task(os.path.basename(directory.rstrip(os.sep)) or "task", directory, cols,
              label, names, out)


def encode_split(tokenizer, split: TaskSplit, seq_len: int) -> dict[str, np.ndarray]:
  """(N, T) int32 BATCH_KEYS rows: [CLS] a [SEP] (b [SEP]), padded with pad_id."""
  encoded = [tokenizer.encode_batch(col) for col in split.texts]
  n = len(split.labels)
  pair = len(encoded) == 2
  budget = seq_len - (3 if pair else 2)
  ids = np.full((n, seq_len), tokenizer.pad_id, np.int32)
  seg = np.zeros((n, seq_len), np.int32)
  types = np.zeros((n, seq_len), np.int32)
  starts = np.zeros((n, seq_len), np.int32)
  for r in range(n):
    parts = [list(e[r][0]) for e in encoded]
    flags = [[int(x) for x in e[r][1]] for e in encoded]
    # Longest first: drop the last token of the longer text until both fit.
    while sum(map(len, parts)) > budget:
      j = int(np.argmax([len(p) for p in parts]))
      parts[j].pop()
      flags[j].pop()
    row = [tokenizer.cls_id] + parts[0] + [tokenizer.sep_id]
    st = [1] + flags[0] + [1]
    tt = [0] * len(row)
    if pair:
      row += parts[1] + [tokenizer.sep_id]
      st += flags[1] + [1]
      tt += [1] * (len(parts[1]) + 1)
    k = len(row)
    ids[r, :k], seg[r, :k], types[r, :k], starts[r, :k] = row, 1, tt, st
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy()
  return dict(input_ids=ids, segment_ids=seg, positions=positions, token_type_ids=types,
              word_starts=starts)


class LabeledBatches:
  """Rows with labels: `batch(step)` (a pure function of (seed, step)) and
  `eval_batches(n)` (whole batches in file order); each process takes its slice."""

  def __init__(self, rows: dict, labels: np.ndarray, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    n = len(labels)
    if n < global_batch:
      # A small set repeats rows within a batch rather than fail.
      reps = -(-global_batch // n)
      rows = {k: np.tile(v, (reps, 1)) for k, v in rows.items()}
      labels = np.tile(labels, reps)
    self.rows, self.labels = rows, labels
    self.global_batch, self.seed = global_batch, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local

  @property
  def steps_per_epoch(self) -> int:
    return len(self.labels) // self.global_batch

  def _take(self, index) -> dict:
    return dict({k: v[index] for k, v in self.rows.items()}, labels=self.labels[index])

  def batch(self, step: int) -> dict:
    epoch, within = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
    start = within * self.global_batch + self.offset
    return self._take(order[start:start + self.local])

  def eval_batches(self, num_batches: int) -> list[dict]:
    out = []
    for i in range(min(num_batches, self.steps_per_epoch)):
      start = i * self.global_batch + self.offset
      out.append(self._take(np.arange(start, start + self.local)))
    return out


def task_from_config(config) -> Task:
  d = config.data
  return load_task(d.task, d.get("text_columns", "") or "", d.get("label_column", "") or "")


class GlueSource:
  """The trainer's data source for `data.task` (see `data/sources.py`)."""

  iterator = None

  def __init__(self, config, workdir: str):
    from amos_jax.data.sources import check_vocab
    from amos_jax.data.tokenizer import load_tokenizer
    from amos_jax.objectives.base import SpecialTokens
    del workdir
    t = config.train
    if not config.data.tokenizer:
      raise DataError("data.task needs data.tokenizer (the model's tokenizer); "
                      "amos-eval glue sets it from --model")
    self.task = task = task_from_config(config)
    want = task.num_labels
    if int(config.objective.get("num_labels", want)) != want:
      raise DataError(f"objective.num_labels={config.objective.num_labels} but "
                      f"{task.directory}/train.tsv has {want} "
                      f"{'output (regression)' if task.regression else 'labels'}")
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_vocab(config, tokenizer.vocab_size)
    self.tokens = SpecialTokens.of(tokenizer)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self.train = LabeledBatches(encode_split(tokenizer, task.splits["train"], t.seq_len),
                                task.label_values("train"), t.batch_size, t.seed, **where)
    self.eval = LabeledBatches(encode_split(tokenizer, task.splits["dev"], t.seq_len),
                               task.label_values("dev"), t.batch_size, t.seed, **where)
    kind = "regression" if task.regression else f"{task.num_labels} labels"
    self.summary = (f"task {task.name} ({kind}; columns {', '.join(task.text_columns)}): "
                    f"{len(task.splits['train'].labels)} train, "
                    f"{len(task.splits['dev'].labels)} dev rows; vocab "
                    f"{tokenizer.vocab_size}")

  def batch(self, step: int) -> dict:
    return self.train.batch(step)

  def eval_batches(self, n: int) -> list[dict]:
    return self.eval.eval_batches(n)
