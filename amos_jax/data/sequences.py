"""In-memory corpus -> fixed-length [CLS] ... [SEP] sequences, batched by step.

The small-corpus path (the embedded demo corpus, a text file): documents are
tokenized once, concatenated and cut into rows of T tokens. The batch for step s is
a function of (seed, s) alone, so a resumed run sees exactly the batches it would
have seen. Large corpora go through `amos-prepare` and `data/pipeline.py` instead.
"""
from __future__ import annotations

import numpy as np

from amos_jax import paths
from amos_jax.data import corpus as corpus_lib
from amos_jax.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from amos_jax.errors import DataError


def load_documents(spec: str) -> list[str]:
  """'demo' (the embedded corpus) or text files/globs (comma separated), one
  document per line.

  Lines that are not UTF-8 are counted and logged (bad bytes become U+FFFD); a file
  that is mostly not UTF-8 text (binary, compressed, UTF-16) raises DataError.
  """
  if spec == "demo":
    return corpus_lib.demo_documents()
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise DataError(f"data.corpus={spec!r} names no file; give a text file (one "
                    "document per line), a glob, or 'demo'")
  paths = corpus_lib.expand_inputs(
      parts, what="data.corpus", specs=False,
      hint="give a text file (one document per line), a glob, or 'demo'")
  stats = corpus_lib.SourceStats()
  docs = []
  for path in paths:
    try:
      docs.extend(corpus_lib.text_documents(path, "line", stats))
    except OSError as e:
      raise DataError(f"data.corpus: cannot read {e.filename or path} "
                      f"({e.strerror or e})") from None
  stats.log_warnings()
  if not docs:
    raise DataError(f"data.corpus={spec!r} holds no text; give a text file with one "
                    "document per line")
  return docs


def split_documents(docs: list[str], eval_fraction: float):
  """Every k-th document (k = 1/eval_fraction) is held out for the eval loss."""
  if eval_fraction <= 0:
    return docs, []
  k = max(2, int(round(1.0 / eval_fraction)))
  return ([d for i, d in enumerate(docs) if i % k], [d for i, d in enumerate(docs)
                                                     if i % k == 0])


def get_tokenizer(config, workdir: str, train_docs: list[str]) -> Tokenizer:
  """The configured tokenizer, or a sentencepiece model trained on the corpus (kept
  in workdir/tokenizer so that a resumed run reuses it)."""
  if config.data.tokenizer:
    return load_tokenizer(config.data.tokenizer)
  directory = paths.join(workdir, "tokenizer")
  if paths.exists(directory):
    return load_tokenizer(directory)
  import jax
  # Process 0 trains and saves it; the other hosts read that one, so all agree.
  tok = None
  if jax.process_index() == 0:
    tok = train_sentencepiece(train_docs, vocab_size=config.model.vocab_size,
                              model_type=config.data.tokenizer_type,
                              vocab_flag="model.vocab_size")
    tok.save(directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("amos_jax_tokenizer_saved")
  return tok if tok is not None else load_tokenizer(directory)


def make_rows(tokenizer: Tokenizer, docs: list[str], seq_len: int,
              split: str = "train"):
  """Concatenated documents cut into (N, T) [CLS] ... [SEP] rows, plus word starts.

  split: "train" or "eval" (the held-out documents), named when they are too few.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  body = seq_len - 2
  ids, starts = [], []
  for doc_ids, doc_starts in tokenizer.encode_batch(docs):
    ids.extend(doc_ids)
    starts.extend(doc_starts)
  n = len(ids) // body
  if n == 0 and split == "eval":
    raise DataError(
        f"the held-out split (data.eval_fraction) has {len(ids)} tokens, fewer than one "
        f"sequence of train.seq_len={seq_len}; raise data.eval_fraction, or set it to 0 "
        "for no eval loss")
  if n == 0:
    raise DataError(
        f"the corpus (training split) has {len(ids)} tokens, fewer than one sequence of "
        f"train.seq_len={seq_len}; give more text in data.corpus or lower train.seq_len")
  ids = np.asarray(ids[:n * body], np.int32).reshape(n, body)
  starts = np.asarray(starts[:n * body], np.int32).reshape(n, body)
  rows = np.concatenate([np.full((n, 1), tokenizer.cls_id, np.int32), ids,
                         np.full((n, 1), tokenizer.sep_id, np.int32)], axis=1)
  word_starts = np.concatenate([np.ones((n, 1), np.int32), starts,
                                np.ones((n, 1), np.int32)], axis=1)
  return rows, word_starts


class SequenceBatches:
  """Batches of fixed-length rows: `batch(step)` for training, `eval_batches()`.

  Each process takes its own contiguous slice of the global batch rows.
  """

  def __init__(self, rows, word_starts, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if len(rows) < global_batch:
      # Small corpora repeat rows within a batch rather than fail.
      reps = -(-global_batch // len(rows))
      rows, word_starts = np.tile(rows, (reps, 1)), np.tile(word_starts, (reps, 1))
    self.rows, self.word_starts = rows, word_starts
    self.global_batch, self.seed = global_batch, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local

  @property
  def steps_per_epoch(self) -> int:
    return len(self.rows) // self.global_batch

  def _rows_for(self, index: np.ndarray) -> dict:
    ids = self.rows[index]
    t = ids.shape[1]
    return {
        "input_ids": ids,
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape).copy(),
        "token_type_ids": np.zeros_like(ids),
        "word_starts": self.word_starts[index],
    }

  def batch(self, step: int) -> dict:
    """This process's rows of the global batch for `step` (a pure function of step)."""
    epoch, within = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
    start = within * self.global_batch + self.offset
    return self._rows_for(order[start:start + self.local])

  def eval_batches(self, num_batches: int) -> list[dict]:
    """The first `num_batches` batches in file order (held-out rows)."""
    out = []
    for i in range(min(num_batches, self.steps_per_epoch)):
      start = i * self.global_batch + self.offset
      out.append(self._rows_for(np.arange(start, start + self.local)))
    return out
