"""Paired and triplet text for the contrastive objectives (in-batch negatives, SimCSE).

Inputs:
  JSON Lines  {"query": ..., "positive": ..., "negatives": [...]}   (field names set
              by config; "negatives" optional)
  TSV         query<TAB>positive[<TAB>negative ...]   (a `query\tpositive` header
              line is skipped); one column = sentences alone (unsupervised SimCSE)

Batches (per process, B_local = global_batch_size // process_count) are nested dicts
of int32 numpy arrays, one encoder input per text field:
  batch["query"]     input_ids, segment_ids, positions, token_type_ids  (B, Tq)
  batch["positive"]  the same, (B, Tp)             (absent for one-column data)
  batch["negatives"] the same, (B, N, Tp)          (only when num_negatives > 0)
Each text is [CLS] tokens [SEP], truncated to its length, padded with 0; one segment
per row. The iterator is a grain DatasetIterator (get_state/set_state, Orbax via
grain.checkpoint.CheckpointSave), deterministic by seed, sharded by process, as in
`pipeline`.
"""
from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from amos_jax.data import corpus
from amos_jax.data import tokenizer as tk
from amos_jax.errors import ConfigError, DataError

log = logging.getLogger("amos_jax")


@dataclasses.dataclass(frozen=True)
class PairsConfig:
  paths: tuple[str, ...]
  tokenizer: str                   # anything load_tokenizer accepts
  query_len: int = 64
  passage_len: int = 256
  num_negatives: int = 0           # per query; rows with fewer are skipped
  global_batch_size: int = 32
  seed: int = 0
  num_epochs: int | None = None
  process_index: int | None = None
  process_count: int | None = None
  drop_remainder: bool = True
  query_field: str = "query"
  positive_field: str = "positive"
  negatives_field: str = "negatives"


Example = tuple  # (query, positive or None, negatives tuple)


def _jsonl_rows(path, cfg, stats):
  for obj in corpus.iter_jsonl(path, cfg.query_field, stats):
    negs = obj.get(cfg.negatives_field) or ()
    if isinstance(negs, str):
      negs = (negs,)
    pos = obj.get(cfg.positive_field)
    yield (str(obj[cfg.query_field]), None if pos is None else str(pos),
           tuple(map(str, negs)))


def _tsv_rows(path, stats):
  corpus.check_text_file(path)
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      cols = stats.decode(raw, path).rstrip("\r\n").split("\t")
      if not any(c.strip() for c in cols):
        continue
      if n == 1 and [c.lower() for c in cols[:2]] == ["query", "positive"][:len(cols[:2])]:
        continue  # header
      yield cols[0], (cols[1] if len(cols) > 1 else None), tuple(cols[2:])
  stats.check(path)


def read_examples(cfg: PairsConfig) -> list[Example]:
  """All examples of cfg.paths, in file order; bad input stops with one line."""
  stats = corpus.SourceStats()
  rows, short = [], 0
  paths = corpus.expand_inputs(map(str, cfg.paths), what="pairs file", specs=False)
  for path in paths:
    it = _jsonl_rows(path, cfg, stats) if path.endswith((".jsonl", ".json")) else \
        _tsv_rows(path, stats)
    for q, p, negs in it:
      if len(negs) < cfg.num_negatives:
        short += 1
        continue
      rows.append((q, p, negs[:cfg.num_negatives]))
  stats.log_warnings()
  if short:
    log.warning(f"skipped {short} example(s) with fewer than num_negatives="
                f"{cfg.num_negatives} negatives")
  if not rows:
    why = (f"each has fewer than num_negatives={cfg.num_negatives} negatives; lower it"
           if short else "give a file with at least one example")
    raise DataError(f"no examples in {', '.join(map(str, cfg.paths))}: {why}")
  has_pos = {p is not None for _, p, _ in rows}
  if len(has_pos) > 1:
    raise DataError("some examples have a positive and some do not; "
                    "give every row a positive, or none (unsupervised SimCSE)")
  if cfg.num_negatives and has_pos == {False}:
    raise ConfigError("num_negatives > 0 needs a positive in every example; "
                      "set num_negatives=0 or give positives")
  return rows


def encode_texts(tok: tk.Tokenizer, texts, length: int) -> dict[str, np.ndarray]:
  """Texts -> (len(texts), length) encoder inputs: [CLS] tokens [SEP], padded."""
  out = {k: np.zeros((len(texts), length), np.int32)
         for k in ("input_ids", "segment_ids", "positions", "token_type_ids")}
  for r, (ids, _) in enumerate(tok.encode_batch(list(texts))):
    ids = [tok.cls_id] + ids[:length - 2] + [tok.sep_id]
    out["input_ids"][r, :len(ids)] = ids
    out["segment_ids"][r, :len(ids)] = 1
    out["positions"][r, :len(ids)] = np.arange(len(ids))
  return out


class _Encode(grain.transforms.Map):
  def __init__(self, tok, cfg):
    self.tok, self.cfg = tok, cfg

  def map(self, ex):
    q, p, negs = ex
    cfg = self.cfg
    out = {"query": {k: v[0] for k, v in encode_texts(self.tok, [q], cfg.query_len).items()}}
    if p is not None:
      texts = encode_texts(self.tok, (p,) + negs, cfg.passage_len)
      out["positive"] = {k: v[0] for k, v in texts.items()}
      if negs:
        out["negatives"] = {k: v[1:] for k, v in texts.items()}
    return out


def make_pairs_dataset(cfg: PairsConfig, tok: tk.Tokenizer | None = None) -> grain.IterDataset:
  """Shuffled, process-sharded, tokenized, batched pairs (see module docstring)."""
  if cfg.query_len < 3 or cfg.passage_len < 3:
    raise ConfigError("query_len and passage_len must be at least 3")
  if cfg.process_index is None or cfg.process_count is None:
    import jax
    index = jax.process_index() if cfg.process_index is None else cfg.process_index
    count = jax.process_count() if cfg.process_count is None else cfg.process_count
  else:
    index, count = cfg.process_index, cfg.process_count
  if cfg.global_batch_size % count:
    raise ConfigError(f"batch size {cfg.global_batch_size} does not divide over "
                      f"{count} processes; use a multiple of {count}")
  tok = tok or tk.load_tokenizer(cfg.tokenizer)
  ds = grain.MapDataset.source(read_examples(cfg))
  ds = ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs)[index::count]
  ds = ds.map(_Encode(tok, cfg)).batch(cfg.global_batch_size // count,
                                       drop_remainder=cfg.drop_remainder)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def make_pairs_iterator(cfg: PairsConfig, tok: tk.Tokenizer | None = None):
  """A checkpointable iterator of pair batches."""
  return iter(make_pairs_dataset(cfg, tok))
