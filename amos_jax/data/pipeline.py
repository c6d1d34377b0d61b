"""The pre-training input pipeline: prepared ArrayRecord shards -> per-process batches.

Stages (grain): documents shuffled globally by seed (a fresh permutation each epoch)
-> repeated for `num_epochs` (None: forever) -> sharded by process (every
`process_count`-th document of the global order, from `process_index`) -> split into
pieces of at most seq_len - 2 tokens, each laid out [CLS] piece [SEP] -> packed
first-fit into rows (or one piece per row, padded) -> batched.

A batch is a dict of int32 numpy arrays, each (B_local, T), B_local =
global_batch_size // process_count:
  input_ids       0 = [PAD]
  segment_ids     0 on padding, 1..n numbering the pieces packed in a row
  positions       position within its piece, restarting at 0
  token_type_ids  0/1 for sentence A/B (all 0 unless pair_segments)
  word_starts     1 where a token begins a word (whole-word masking)
The model masks attention with (seg_q == seg_k) & (seg_q > 0).

Resuming: the iterator is a grain `DatasetIterator`; its state is a small dict.
Save it in the same Orbax step as the train state and restore it into a fresh
iterator built from the same config:

  it = make_iterator(cfg)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(it)))   # `it` continues in place

(each process writes its own iterator file). Without Orbax: `it.get_state()` /
`it.set_state(state)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from amos_jax.data import records
from amos_jax.errors import ConfigError, DataError, one_line

KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids", "word_starts")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  data_dir: str
  seq_len: int = 512
  global_batch_size: int = 32
  seed: int = 0
  packing: bool = True
  pair_segments: bool = False      # split each piece into sentences A/B (token types)
  num_epochs: int | None = None    # None: repeat forever
  process_index: int | None = None  # None: jax.process_index()
  process_count: int | None = None  # None: jax.process_count()
  num_packing_bins: int | None = None  # None: the per-process batch size
  drop_remainder: bool = True
  prefetch: int = 2                # batches a background thread keeps ready (0: none)
  vocab_size: int | None = None    # the model's; checked against the manifest


# ----------------------------------------------------------------- sources
class _Shards(grain.sources.RandomAccessDataSource):
  """ArrayRecord shards whose read errors name the file."""

  def __init__(self, manifest):
    self._paths = records.shard_paths(manifest)
    self._ends = np.cumsum([s["num_records"] for s in manifest["shards"]])
    try:
      self._src = grain.sources.ArrayRecordDataSource(self._paths)
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
      raise DataError(f"cannot open shards in {manifest['dir']} ({one_line(e)}); "
                      "run amos-prepare --verify on it") from None
    if len(self._src) != int(self._ends[-1]):
      raise DataError(f"{manifest['dir']}: shards hold {len(self._src)} records, "
                      f"manifest says {int(self._ends[-1])}; re-run amos-prepare")

  def __len__(self):
    return len(self._src)

  def __getitem__(self, index):
    try:
      return self._src[index]
    except Exception as e:
      path = self._paths[int(np.searchsorted(self._ends, index, side="right"))]
      raise DataError(f"corrupt shard {path}: cannot read record ({one_line(e)}); "
                      "re-run amos-prepare") from None


def _decode(record: bytes) -> dict[str, np.ndarray]:
  ids, words, sents = records.decode_record(record)
  return dict(ids=ids, word_starts=words, sentence_starts=sents)


class _SplitIntoPieces(grain.experimental.FlatMapTransform):
  """Document -> pieces of <= seq_len tokens: [CLS] A [SEP] (B [SEP])."""

  def __init__(self, seq_len, cls_id, sep_id, pair_segments):
    self.body = seq_len - (3 if pair_segments else 2)
    self.max_fan_out = 1 << 20  # unused by the iterator flat map; documents are unbounded
    self.cls_id, self.sep_id, self.pair = cls_id, sep_id, pair_segments

  def flat_map(self, doc):
    ids, words, sents = doc["ids"], doc["word_starts"], doc["sentence_starts"]
    return [self._wrap(ids[i:i + self.body], words[i:i + self.body], sents[i:i + self.body])
            for i in range(0, len(ids), self.body)]

  def _wrap(self, ids, words, sents):
    n = len(ids)
    cut = n
    if self.pair and n >= 2:
      # Split at the sentence start nearest the middle; mid-sentence if there is none.
      starts = np.flatnonzero(sents[1:]) + 1
      cut = int(starts[np.argmin(np.abs(starts - n / 2))]) if len(starts) else n // 2
    c, s = [self.cls_id], [self.sep_id]
    parts = [c, ids[:cut], s] + ([ids[cut:], s] if cut < n else [])
    out_ids = np.concatenate(parts).astype(np.int32)
    # [CLS]/[SEP] count as word starts: masking never selects them anyway, and a
    # word must not run across a separator.
    w = [[1], words[:cut], [1]] + ([words[cut:], [1]] if cut < n else [])
    types = np.zeros(len(out_ids), np.int32)
    types[cut + 2:] = 1
    return dict(input_ids=out_ids, word_starts=np.concatenate(w).astype(np.int32),
                token_type_ids=types)


def _pad_piece(piece, seq_len):
  """One piece per row: segment 1, positions 0..n-1, zeros after."""
  n = len(piece["input_ids"])
  out = {}
  for k in ("input_ids", "word_starts", "token_type_ids"):
    row = np.zeros(seq_len, np.int32)
    row[:n] = piece[k]
    out[k] = row
  out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
  return out


def _rename_packed(ex):
  return dict(input_ids=ex["input_ids"].astype(np.int32),
              segment_ids=ex["input_ids_segment_ids"].astype(np.int32),
              positions=ex["input_ids_positions"].astype(np.int32),
              token_type_ids=ex["token_type_ids"].astype(np.int32),
              word_starts=ex["word_starts"].astype(np.int32))


# ---------------------------------------------------------------- pipeline
def _processes(cfg):
  if cfg.process_index is not None and cfg.process_count is not None:
    return cfg.process_index, cfg.process_count
  import jax
  return (jax.process_index() if cfg.process_index is None else cfg.process_index,
          jax.process_count() if cfg.process_count is None else cfg.process_count)


def local_batch_size(cfg: PipelineConfig) -> int:
  _, count = _processes(cfg)
  if cfg.global_batch_size % count:
    raise ConfigError(f"train.batch_size={cfg.global_batch_size} does not divide "
                      f"over {count} processes; use a multiple of {count}")
  return cfg.global_batch_size // count


def make_dataset(cfg: PipelineConfig) -> grain.IterDataset:
  """The grain dataset of per-process batches (see the module docstring)."""
  if cfg.seq_len < 4:
    raise ConfigError(f"train.seq_len={cfg.seq_len} is too short; use at least 4")
  index, count = _processes(cfg)
  if not 0 <= index < count:
    raise ConfigError(f"process_index {index} is outside 0..{count - 1}")
  batch = local_batch_size(cfg)
  manifest = records.load_manifest(cfg.data_dir)
  records.check_vocab(manifest, cfg.vocab_size)
  tok = manifest["tokenizer"]

  ds = grain.MapDataset.source(_Shards(manifest))
  # Shuffle before repeat: grain reseeds the permutation for every epoch.
  ds = ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
  # Shard after the global shuffle, so processes split each epoch's documents.
  ds = ds[index::count].map(_decode)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it = grain.experimental.FlatMapIterDataset(
      it, _SplitIntoPieces(cfg.seq_len, tok["cls_id"], tok["sep_id"], cfg.pair_segments))
  if cfg.packing:
    lengths = dict(input_ids=cfg.seq_len, word_starts=cfg.seq_len,
                   token_type_ids=cfg.seq_len)
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=cfg.num_packing_bins or batch,
        shuffle_bins=False, meta_features=("word_starts", "token_type_ids"))
    it = it.map(_rename_packed)
  else:
    it = it.map(lambda p: _pad_piece(p, cfg.seq_len))
  it = it.batch(batch, drop_remainder=cfg.drop_remainder)
  if cfg.prefetch:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
  return it


def make_iterator(cfg: PipelineConfig) -> grain.DatasetIterator:
  """A checkpointable iterator: next() -> batch dict; get_state()/set_state()."""
  return iter(make_dataset(cfg))


def to_global_arrays(batch: dict[str, np.ndarray], mesh, batch_spec) -> dict[str, Any]:
  """Per-process (B_local, T) numpy -> global jax.Arrays sharded as `batch_spec`.

  batch_spec: a PartitionSpec over `mesh` (e.g. P(("data", "fsdp"))) or a Sharding.
  """
  import jax
  sharding = batch_spec
  if not isinstance(batch_spec, jax.sharding.Sharding):
    sharding = jax.sharding.NamedSharding(mesh, batch_spec)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
