"""Where a run's batches come from, behind one interface.

  source = make_source(config, workdir)
  source.tokens          SpecialTokens of the tokenizer (the objective's masking)
  source.batch(step)     this process's rows of the global batch for `step`: a dict of
                         (B_local, T) int32 arrays with `objectives.base.BATCH_KEYS`
  source.eval_batches(n) up to n held-out batches, the same every time
  source.iterator        the checkpointable iterator (grain), or None when batches are
                         a pure function of the step
  source.summary         one line for the log

Three sources: the small in-memory path (`data.corpus`: the embedded demo corpus or
text files), prepared ArrayRecord shards (`data.prepared`, from amos-prepare), and
labeled GLUE-layout tasks (`data.task`, `data/glue.py`; batches also carry `labels`).
"""
from __future__ import annotations

from typing import Protocol

import jax

from amos_jax.errors import ConfigError
from amos_jax.objectives.base import SpecialTokens


class DataSource(Protocol):
  tokens: SpecialTokens
  iterator: object | None
  summary: str

  def batch(self, step: int) -> dict: ...

  def eval_batches(self, n: int) -> list[dict]: ...


def check_vocab(config, vocab_size: int) -> None:
  if vocab_size != config.model.vocab_size:
    raise ConfigError(
        f"model.vocab_size={config.model.vocab_size} but the tokenizer has "
        f"{vocab_size} ids; set --config.model.vocab_size={vocab_size}")


class InMemorySource:
  """The small-corpus path: batches are a function of the step (no iterator state)."""

  iterator = None

  def __init__(self, config, workdir: str):
    from amos_jax.data import sequences
    t = config.train
    docs = sequences.load_documents(config.data.corpus)
    train_docs, eval_docs = sequences.split_documents(docs, config.data.eval_fraction)
    tokenizer = sequences.get_tokenizer(config, workdir, train_docs)
    check_vocab(config, tokenizer.vocab_size)
    self.tokens = SpecialTokens.of(tokenizer)
    rows, starts = sequences.make_rows(tokenizer, train_docs, t.seq_len)
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self.train = sequences.SequenceBatches(rows, starts, t.batch_size, t.seed, **where)
    self.eval = None
    if eval_docs:
      rows, starts = sequences.make_rows(tokenizer, eval_docs, t.seq_len, split="eval")
      self.eval = sequences.SequenceBatches(rows, starts, t.batch_size, t.seed, **where)
    self.summary = (f"{len(self.train.rows)} train rows ({self.train.rows.size} tokens), "
                    f"{0 if self.eval is None else len(self.eval.rows)} eval rows; "
                    f"vocab {tokenizer.vocab_size}")

  def batch(self, step: int) -> dict:
    return self.train.batch(step)

  def eval_batches(self, n: int) -> list[dict]:
    return self.eval.eval_batches(n) if self.eval is not None else []


class PreparedSource:
  """amos-prepare output through the grain pipeline; its iterator state is saved in
  each checkpoint, so a resumed run reads on from where the checkpoint was taken."""

  def __init__(self, config):
    from amos_jax.data import pipeline, records
    t = config.train
    manifest = records.load_manifest(config.data.prepared)
    tok = manifest["tokenizer"]
    check_vocab(config, int(tok["vocab_size"]))
    self.tokens = SpecialTokens.of(tok)
    self.iterator = pipeline.make_iterator(pipeline.PipelineConfig(
        data_dir=config.data.prepared, seq_len=t.seq_len, global_batch_size=t.batch_size,
        seed=t.seed, vocab_size=config.model.vocab_size))
    self.summary = (f"prepared data {manifest['dir']} ({len(manifest['shards'])} "
                    f"shards); vocab {tok['vocab_size']}")

  def batch(self, step: int) -> dict:
    del step  # the iterator's position is the step's (both are checkpointed)
    return next(self.iterator)

  def eval_batches(self, n: int) -> list[dict]:
    del n
    return []


def make_source(config, workdir: str) -> DataSource:
  """The configured source: `data.task` (a labeled GLUE-layout folder,
  `data/glue.py`) if set, else `data.prepared` if set, else `data.corpus`."""
  if config.data.get("task"):
    from amos_jax.data.glue import GlueSource
    return GlueSource(config, workdir)
  if config.data.get("prepared"):
    return PreparedSource(config)
  return InMemorySource(config, workdir)
