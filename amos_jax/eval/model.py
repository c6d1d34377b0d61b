"""Model references for every evaluation command, and text -> embeddings.

A reference is a training workdir (its latest checkpoint; `WORKDIR@STEP` for
another) or `hf:PATH` (a transformers / sentence-transformers folder with
config.json and model.safetensors). `load_model` builds a bare `Encoder` and fills
it: from the workdir's 'encoder' (mlm) or 'discriminator' (electra, amos) params, or
through `amos_jax/hf/names.py` from the folder's tensors.

A size is (layer, dim) as in Starbucks' 2D Matryoshka: the embedding is pooled from
hidden_states[layer] (0 = the embedding block), truncated to its first dim
coordinates and, for cosine similarity, re-normalized.

Embedding packs and buckets by length (`plan_rows`): short texts share packed rows
(each text a segment that attends only to itself, with its own positions, pooled
alone), longer ones get a row of their own padded to one of a few lengths
(`bucket_lengths`: at most 3 tokens more up to 32, 7 up to 64, 25% above), whichever
costs the fewest FLOPs. Rows per batch are chosen so each batch holds about
`batch_tokens` tokens (or `batch_size` texts), the last batch of a length cut to a
power of two of rows; only the shapes that occur compile a program.
Batches are split over every device (NamedSharding on a 1-D mesh), parameters are
replicated: the same code runs on one CPU or on an accelerator.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from amos_jax import paths
from amos_jax.errors import AmosError, CheckpointError, ConfigError, DataError, one_line
from amos_jax.eval.search import ROWS, corpus_mesh
from amos_jax.model.encoder import Encoder, EncoderConfig
from amos_jax.model.heads import pool_segments
from amos_jax.model.tracing import cheap_tracer_errors
from amos_jax.train.sharding import compiler_options

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """A parsed --model value. kind: 'workdir' | 'hf'; step: None = latest."""
  kind: str
  path: str
  step: int | None = None

  @property
  def default_out(self) -> str:
    """Where results go without --out: under the workdir, else the current directory."""
    return paths.join(self.path, "eval") if self.kind == "workdir" else "."


def parse_model_ref(ref: str) -> ModelRef:
  """'hf:PATH' | 'WORKDIR' | 'WORKDIR@STEP' -> ModelRef (paths made absolute)."""
  if not ref:
    raise ConfigError("--model is empty; give a workdir, WORKDIR@STEP or hf:PATH")
  if ref.startswith("hf:") and not paths.is_local(ref[3:]):
    return ModelRef("hf", paths.local_copy(ref[3:]))  # a local copy of a gs:// folder
  if not paths.is_local(ref):
    path, _, step_text = ref.rpartition("@") if "@" in ref else (ref, "", "0")
    if not step_text.isdigit():
      raise ConfigError(f"--model {ref}: the step after @ must be a number, e.g. "
                        f"{path}@1000")
    if not paths.exists(paths.join(path, "config.json")):
      raise CheckpointError(f"--model {ref}: {path} is not a training workdir (no "
                            "config.json); give a workdir, WORKDIR@STEP or hf:PATH")
    return ModelRef("workdir", path, int(step_text) if "@" in ref else None)
  if ref.startswith("hf:"):
    path = os.path.abspath(os.path.expanduser(ref[3:]))
    if not os.path.isdir(path):
      raise CheckpointError(f"--model {ref}: {path} is not a folder; give hf:PATH of a "
                            "transformers or sentence-transformers model folder")
    return ModelRef("hf", path)
  path, step = ref, None
  if "@" in ref and not os.path.exists(ref):
    path, _, step_text = ref.rpartition("@")
    if not step_text.isdigit():
      raise ConfigError(f"--model {ref}: the step after @ must be a number, e.g. "
                        f"{path}@1000")
    step = int(step_text)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"--model {ref}: {path} is not a training workdir (no "
                          "config.json); give a workdir, WORKDIR@STEP or hf:PATH")
  return ModelRef("workdir", path, step)


# ----------------------------------------------------------------- tokenizers
class _HFJsonTokenizer:
  """A folder's tokenizer.json (exports of sentencepiece models have only that)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer
    self._tok = HFTokenizer.from_file(path)
    for name, piece in (("pad_id", "[PAD]"), ("cls_id", "[CLS]"), ("sep_id", "[SEP]")):
      i = self._tok.token_to_id(piece)
      if i is None:
        raise CheckpointError(f"{path} has no {piece} token; amos-eval reads BERT-style "
                              "tokenizers")
      setattr(self, name, i)

  def encode_batch(self, texts):
    return [(list(e.ids), []) for e in self._tok.encode_batch(list(texts),
                                                              add_special_tokens=False)]


def _load_tokenizer(spec: str):
  from amos_jax.data.tokenizer import load_tokenizer
  try:
    return load_tokenizer(spec)
  except (AmosError, SystemExit) as e:
    fallback = os.path.join(spec, "tokenizer.json")
    if os.path.isdir(spec) and os.path.isfile(fallback):
      return _HFJsonTokenizer(fallback)
    raise CheckpointError(one_line(str(e)).removeprefix("error: ")) from None


# ---------------------------------------------------------------------- model
@dataclasses.dataclass
class EmbeddingModel:
  """An encoder ready to embed text. `identity` names the weights (for indexes)."""
  ref: ModelRef
  config: EncoderConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: object
  max_len: int
  pooling: str
  identity: str
  # Compiled embedding functions by (layers, pooling): compiled once per model.
  _fns: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  @property
  def width(self) -> int:
    return self.config.hidden_size


def _bare_encoder(cfg: EncoderConfig):
  with cheap_tracer_errors():
    encoder = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(encoder, nnx.Param)


def _filled(cfg: EncoderConfig, lookup, where: str):
  """(graphdef, params) of an Encoder whose every parameter `lookup(path)` gives."""
  graphdef, abstract = _bare_encoder(cfg)
  flat = []
  missing, mismatched = [], []
  for path, var in nnx.to_flat_state(abstract):
    value = lookup(path)
    name = "/".join(map(str, path))
    if value is None:
      missing.append(name)
      continue
    if tuple(value.shape) != tuple(var.shape):
      mismatched.append(f"{name} {tuple(value.shape)} vs {tuple(var.shape)}")
      continue
    flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  if missing or mismatched:
    what = (f"{len(missing)} encoder tensors missing ({', '.join(missing[:3])})" if missing
            else f"shape mismatches ({'; '.join(mismatched[:2])})")
    raise CheckpointError(f"{where}: {what}; is it an encoder of the size its config says?")
  return graphdef, nnx.from_flat_state(flat)


def _load_workdir(ref: ModelRef):
  from amos_jax.hf.export import load_run, load_run_tokenizer
  try:
    config, flat, step = load_run(ref.path, ref.step)
  except (AmosError, SystemExit) as e:
    raise CheckpointError(one_line(str(e)).removeprefix("error: ")) from None
  except Exception as e:  # noqa: BLE001 - Orbax/tensorstore failures on unreadable files
    raise CheckpointError(f"{ref.path}: the checkpoint cannot be read "
                          f"({type(e).__name__}: {one_line(str(e))[:200]}); pick another "
                          "step with WORKDIR@STEP") from None
  roots = {p[0] for p in flat}
  root = next((r for r in ("encoder", "discriminator") if r in roots), None)
  if root is None:
    raise CheckpointError(f"{ref.path}: step {step} holds no 'encoder' or 'discriminator' "
                          f"params (found {sorted(map(str, roots))})")
  try:
    cfg = EncoderConfig.from_config(config.model)
  except Exception as e:  # noqa: BLE001 - a config.json from another tool
    raise CheckpointError(f"{ref.path}/config.json has no usable 'model' section ({e})") \
        from None
  # Evaluation is deterministic; the stored dtype policy is kept.
  cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0, remat=False)
  graphdef, params = _filled(cfg, lambda p: flat.get((root,) + tuple(p)),
                             f"{ref.path} step {step}")
  try:
    tok = load_run_tokenizer(ref.path, config)
  except (AmosError, SystemExit) as e:
    raise CheckpointError(one_line(str(e)).removeprefix("error: ")) from None
  seq_len = int(config.get("train", {}).get("seq_len", cfg.max_position_embeddings))
  pooling = (config.get("objective", {}).get("pooling") or
             config.get("eval", {}).get("pooling") or "mean")
  return cfg, graphdef, params, tok, min(seq_len, cfg.max_position_embeddings), pooling, \
      f"{ref.path}@{step}"


def _hf_pooling(path: str) -> str:
  """The pooling a sentence-transformers folder declares (modules.json), else mean."""
  modules = os.path.join(path, "modules.json")
  if os.path.isfile(modules):
    with open(modules) as f:
      for m in json.load(f):
        if m.get("type", "").endswith("Pooling"):
          cfg_path = os.path.join(path, m.get("path", ""), "config.json")
          if os.path.isfile(cfg_path):
            with open(cfg_path) as g:
              pool = json.load(g)
            if pool.get("pooling_mode_cls_token"):
              return "cls"
  return "mean"


def _load_hf(ref: ModelRef):
  from amos_jax.hf import load as hf_load
  from amos_jax.hf import names
  try:
    cfg = EncoderConfig(**hf_load.hf_encoder_config(ref.path), hidden_dropout=0.0,
                        attention_dropout=0.0)
    state = hf_load.read_state_dict(ref.path)
  except (AmosError, SystemExit) as e:
    raise CheckpointError(one_line(str(e)).removeprefix("error: ")) from None
  except Exception as e:  # noqa: BLE001 - a damaged config.json or safetensors file
    raise CheckpointError(f"{ref.path} cannot be read ({type(e).__name__}: "
                          f"{one_line(str(e))[:200]})") from None
  arch, _ = hf_load.detect_architecture(state)
  table = names.layout(arch, ("encoder",))

  def lookup(path):
    named = names.hf_name(("encoder",) + tuple(path), table)
    if named is None or named[0] not in state:
      return None
    value = np.asarray(state[named[0]], np.float32)
    return value.T if named[1] else value

  graphdef, params = _filled(cfg, lookup, ref.path)
  tok = _load_tokenizer(ref.path)
  max_len = cfg.max_position_embeddings
  st_cfg = os.path.join(ref.path, "sentence_bert_config.json")
  if os.path.isfile(st_cfg):
    with open(st_cfg) as f:
      max_len = min(max_len, int(json.load(f).get("max_seq_length") or max_len))
  return cfg, graphdef, params, tok, max_len, _hf_pooling(ref.path), f"hf:{ref.path}"


def load_model(ref: str | ModelRef, *, pooling: str | None = None,
               max_len: int | None = None) -> EmbeddingModel:
  """Reads a model reference; every failure is one CheckpointError/ConfigError."""
  ref = parse_model_ref(ref) if isinstance(ref, str) else ref
  if pooling is not None and pooling not in POOLINGS:
    raise ConfigError(f"--pooling {pooling!r}: use mean or cls")
  loader = _load_workdir if ref.kind == "workdir" else _load_hf
  cfg, graphdef, params, tok, default_len, default_pool, identity = loader(ref)
  if max_len is not None and not 2 < max_len <= cfg.max_position_embeddings:
    raise ConfigError(f"--max-len {max_len}: the model takes 3 to "
                      f"{cfg.max_position_embeddings} tokens")
  return EmbeddingModel(ref, cfg, graphdef, params, tok, max_len or default_len,
                        pooling or default_pool, identity)


def check_size(model: EmbeddingModel, layer: int | None, dim: int | None
               ) -> tuple[int, int]:
  """(layer, dim) with defaults (last layer, full width), refusing sizes outside."""
  layer = model.num_layers if layer is None else int(layer)
  dim = model.width if dim is None else int(dim)
  if not 0 <= layer <= model.num_layers:
    raise ConfigError(f"--layer {layer} is outside the model: it has {model.num_layers} "
                      f"layers (0 = the embedding block)")
  if not 1 <= dim <= model.width:
    raise ConfigError(f"--dim {dim} is outside the model: its width is {model.width}")
  return layer, dim


# ------------------------------------------------------------------ embedding
def bucket_lengths(max_len: int, smallest: int = 4) -> list[int]:
  """Padded lengths: steps of `smallest` up to 8x it, then four steps per doubling
  (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, ...), capped by max_len.

  A row gets at most 3 padding tokens up to 32 tokens, 7 up to 64 and at most 25%
  more above, while only lengths that occur compile a program (at most 24 up to 512
  tokens). Short texts dominate sentence sets: STS-B's sentences have a median of 12
  tokens and 90% are under 25, so steps of 8 padded them by 27% (steps of 4: 11%).
  """
  out, t = [], smallest
  while t < max_len:
    out.append(t)
    t += smallest if t < 8 * smallest else max(smallest, 1 << (t.bit_length() - 3))
  return out + [max_len]


PACK_LENGTHS = (32, 64, 128)   # packed row lengths embed_layers weighs
PACK_SLOTS = 16                # texts a packed row holds at most


def pack_slots(row_len: int) -> int:
  """Texts a packed row of row_len tokens holds at most (the shortest: [CLS] [SEP])."""
  return min(PACK_SLOTS, row_len // 2)


def _best_fit_decreasing(order: np.ndarray, lengths: np.ndarray, row_len: int,
                         slots: int) -> list[list[int]]:
  """Texts (`order`: longest first, each <= row_len tokens) -> rows of <= `slots`
  texts and <= row_len tokens: each text goes to the open row it fills most tightly."""
  rows: list[list[int]] = []
  open_rows: list[list[int]] = [[] for _ in range(row_len + 1)]  # by free tokens
  has_open = 0            # bit f set: some open row has f free tokens
  for i in order:
    need = int(lengths[i])
    fitting = has_open >> need
    if fitting:
      free = need + (fitting & -fitting).bit_length() - 1    # the tightest fit
      r = open_rows[free].pop()
      if not open_rows[free]:
        has_open &= ~(1 << free)
    else:
      r, free = len(rows), row_len
      rows.append([])
    rows[r].append(int(i))
    left = free - need
    if len(rows[r]) < slots and left >= 2:   # the shortest text: [CLS] [SEP]
      open_rows[left].append(r)
      has_open |= 1 << left
  return rows


def plan_rows(lengths: np.ndarray, buckets: Sequence[int], width: int
              ) -> list[tuple[int, list[int]]]:
  """Texts -> padded rows [(row length, text indices)], the plan with the fewest FLOPs.

  Plans: every text alone in a row of its bucket length, or, for R in PACK_LENGTHS,
  the texts of at most R tokens packed into rows of R (`_best_fit_decreasing`, each a
  segment with its own positions) and the rest alone. A row of t tokens costs
  t + t^2 / (6 * width) (dense layers 24 H^2 t FLOPs, attention 4 H t^2). Sentences
  pack: STS-B's pad by 15% alone in buckets and by 2% packed into rows of 64.
  """
  lengths = np.asarray(lengths)
  bucket_of = np.asarray(buckets)[np.searchsorted(buckets, lengths)]
  order = np.argsort(-lengths, kind="stable")
  cost = lambda t: t + t * t / (6 * width)
  alone_cost = cost(bucket_of.astype(np.float64))
  best_r, best_rows, best_cost = 0, [], alone_cost.sum()
  for r in PACK_LENGTHS:
    if r not in buckets or (lengths <= r).sum() < 2:
      continue
    rows = _best_fit_decreasing(order[lengths[order] <= r], lengths, r, pack_slots(r))
    c = alone_cost[lengths > r].sum() + len(rows) * cost(r)
    if c < best_cost:
      best_r, best_rows, best_cost = r, rows, c
  return [(int(bucket_of[i]), [int(i)]) for i in order if lengths[i] > best_r] + [
      (best_r, row) for row in best_rows]


def _pooled_fn(model: EmbeddingModel, layers: tuple[int, ...], pooling: str, slots: int):
  key = (layers, pooling, slots)
  if key in model._fns:
    return model._fns[key]
  # Layers unrolled: a forward pass under scan would stack every layer's parameters
  # (a copy of the whole encoder) and zero-fill stacked outputs on each call, about
  # a third of a MiniLM batch on CPU; forward-only programs compile fast unrolled.
  graphdef = _bare_encoder(dataclasses.replace(model.config, scan_layers=False))[0]

  def fn(params, ids, seg, pos):
    """(B, T) ids, segments (text s of its row = s, padding 0), positions within
    each text -> (len(layers), B, slots, H)."""
    encoder = nnx.merge(graphdef, params)
    hidden = encoder(ids, seg, pos, num_layers=max(layers))
    return jnp.stack([pool_segments(hidden[l], seg, pos, slots, pooling) for l in layers])

  # The trainer's CPU compile options (LLVM level 1): each length compiles about 30%
  # faster and embeds no slower.
  model._fns[key] = jax.jit(fn, compiler_options=compiler_options(corpus_mesh()))
  return model._fns[key]


def _progress(total: int, desc: str, show: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="text", unit_scale=True, file=sys.stderr,
              mininterval=1.0, smoothing=0.1, disable=not show, dynamic_ncols=True)


def embed_layers(model: EmbeddingModel, texts: Sequence[str], layers: Sequence[int], *,
                 pooling: str | None = None, batch_tokens: int = 16384,
                 batch_size: int | None = None, desc: str = "embedding", progress: bool = True,
                 out: np.ndarray | None = None) -> np.ndarray:
  """Pooled (not normalized) embeddings at each of `layers`: (len(layers), N, H) f32.

  batch_tokens: padded tokens per batch (rows = batch_tokens // row length), or
  batch_size: at most that many texts per batch on average whatever their length (as
  sentence-transformers' encode; a batch of packed rows holds the rows' texts, and at
  least one row per device).
  out: where to write them (e.g. a np.memmap for a corpus larger than memory).
  """
  layers = tuple(int(l) for l in layers)
  pooling = pooling or model.pooling
  tok = model.tokenizer
  n = len(texts)
  if out is None:
    out = np.zeros((len(layers), n, model.width), np.float32)
  if n == 0:
    return out
  mesh = corpus_mesh()
  n_dev = mesh.devices.size
  whole_devices = lambda rows: -(-rows // n_dev) * n_dev   # rows split evenly
  batch_sharding = NamedSharding(mesh, P(ROWS))
  params = jax.device_put(model.params, NamedSharding(mesh, P()))
  buckets = bucket_lengths(model.max_len)
  keep = model.max_len - 2
  bar = _progress(n, desc, progress)
  # Tokenize and embed in blocks, so memory for token lists stays bounded.
  block = 1 << 16
  pending = None

  def fetch(item):
    where, result = item
    text, row, slot = where
    out[:, text] = np.asarray(result)[:, row, slot]
    bar.update(len(text))

  try:
    for start in range(0, n, block):
      encoded = tok.encode_batch(list(texts[start:start + block]))
      tokens = [[tok.cls_id] + list(ids[:keep]) + [tok.sep_id] for ids, _ in encoded]
      lengths = np.array([len(r) for r in tokens])
      by_length: dict[int, list[list[int]]] = {}
      for t, row in plan_rows(lengths, buckets, model.width):
        by_length.setdefault(t, []).append(row)
      for t, plan in by_length.items():
        packed = max(len(row) for row in plan) > 1
        fn = _pooled_fn(model, layers, pooling, pack_slots(t) if packed else 1)
        # About batch_tokens per batch (or batch_size texts); the last batch of a
        # length gets the fewest rows that hold it, rounded up to a power of two so
        # that few row counts compile.
        per_row = sum(map(len, plan)) / len(plan)
        per_batch = (whole_devices(max(1, batch_tokens // t)) if not batch_size else
                     max(n_dev, int(batch_size / per_row) // n_dev * n_dev))
        for i in range(0, len(plan), per_batch):
          take = plan[i:i + per_batch]
          padded_rows = whole_devices(min(per_batch, 1 << int(len(take) - 1).bit_length()))
          ids = np.full((padded_rows, t), tok.pad_id, np.int32)
          seg = np.zeros((padded_rows, t), np.int32)
          pos = np.zeros((padded_rows, t), np.int32)
          where = []   # (text, row, slot) of each text in the batch
          for r, row in enumerate(take):
            at = 0
            for s, idx in enumerate(row):
              m = lengths[idx]
              ids[r, at:at + m] = tokens[idx]
              seg[r, at:at + m] = s + 1
              pos[r, at:at + m] = np.arange(m)
              at += m
              where.append((start + idx, r, s))
          result = fn(params, *(jax.device_put(a, batch_sharding) for a in (ids, seg, pos)))
          # One batch in flight: the device computes while the host pads the next.
          if pending is not None:
            fetch(pending)
          pending = (np.array(where).T, result)
    if pending is not None:
      fetch(pending)
  finally:
    bar.close()
  return out


def truncate_normalize(emb: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
  """First `dim` coordinates of (..., H) embeddings, re-normalized to unit length."""
  x = np.ascontiguousarray(emb[..., :dim], np.float32)
  if normalize:
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


def embed(model: EmbeddingModel, texts: Sequence[str], *, layer: int | None = None,
          dim: int | None = None, pooling: str | None = None, normalize: bool = True,
          **kw) -> np.ndarray:
  """(N, dim) embeddings of one size (defaults: last layer, full width)."""
  layer, dim = check_size(model, layer, dim)
  return truncate_normalize(embed_layers(model, texts, (layer,), pooling=pooling, **kw)[0],
                            dim, normalize)
