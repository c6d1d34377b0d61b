"""The interface every objective implements, and what it declares.

An objective is one module in `amos_jax/objectives/` that defines `OBJECTIVE`, a
subclass of `Objective`; `objective.name` in the config is the module's name. The
trainer, the config validator and both Hugging Face directions talk to it only
through this class:

  validate_config(config)          its config section, one ConfigError line per fault
  build_model(rngs)                the nnx.Module holding every trained parameter
  loss_counts(batch)               whole-batch counts the loss means divide by
  loss(model, batch, counts, rng, train) -> (loss, metrics)
  model_flops(batch_size, seq_len) training FLOPs per step (amos-bench's MFU)
  hf_models()                      the transformers folders it exports (and imports)
  export_params(flat)              training params -> the params those folders hold

Special token ids come from the tokenizer once, as `SpecialTokens`, when the
objective is made; nothing derived is written back into the config.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx

from amos_jax.model.encoder import EncoderConfig

# The keys of an input batch, each (B, T) int32: what every data source yields.
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids", "word_starts")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The tokenizer's special ids (amos_jax's sentencepiece layout by default)."""
  pad_id: int = 0
  unk_id: int = 1
  cls_id: int = 2
  sep_id: int = 3
  mask_id: int = 4

  @property
  def ids(self) -> tuple[int, ...]:
    """Every special id, sorted: never chosen for prediction."""
    return tuple(sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id,
                         self.mask_id}))

  @classmethod
  def of(cls, source) -> "SpecialTokens":
    """From a Tokenizer (attributes) or a manifest's tokenizer dict (keys)."""
    get = source.get if isinstance(source, dict) else lambda k: getattr(source, k)
    return cls(**{f.name: int(get(f.name)) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class HFModel:
  """One transformers folder an objective exports (and can import back).

  subdir: '' for the export's top folder, else a sub-folder ('generator').
  arch: the transformers class (BertForMaskedLM, ElectraForPreTraining, ...).
  encoder: the root of the encoder in our params ('encoder', 'discriminator').
  head: the root of the head in our params, or None for a bare encoder.
  encoder_config: sizes of that encoder (its config.json).
  num_layers: export only the first layers (AMOS's per-depth generators).
  shared_embeddings: the root whose `embeddings` block this encoder reads (ELECTRA's
    generator reads the discriminator's); None when it has its own.
  role: what the folder is, for the model card.
  """
  subdir: str
  arch: str
  encoder: str
  head: str | None
  encoder_config: EncoderConfig
  num_layers: int | None = None
  shared_embeddings: str | None = None
  role: str = ""


class Objective:
  """One training objective: model, loss, config section, Hugging Face layout."""

  name: ClassVar[str] = ""

  def __init__(self, config, tokens: SpecialTokens | None = None):
    self.config = config
    self.tokens = tokens or SpecialTokens()

  # ------------------------------------------------------------------ config
  @classmethod
  def validate_config(cls, config) -> None:
    """Raises ConfigError (one line naming the key) for a section that cannot work."""

  # ------------------------------------------------------------------- model
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  # -------------------------------------------------------------------- loss
  def loss_counts(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Whole-batch counts (scalars) the loss divides by.

    The trainer computes them once on the full batch and passes them to every
    micro-batch, so A micro-batches add up to one step on the whole batch.
    """
    del batch
    return {}

  def loss(self, model: nnx.Module, batch: dict[str, jax.Array],
           counts: dict[str, jax.Array], rng: jax.Array,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, {metric name: scalar}); rng is one key or one per row (B,)."""
    raise NotImplementedError

  def model_flops(self, batch_size: int, seq_len: int) -> dict[str, float]:
    """Training FLOPs of one step by component, with 'total' (`model/flops.py`'s
    conventions); {} when the objective does not count them (no MFU then)."""
    del batch_size, seq_len
    return {}

  # ----------------------------------------------------------- Hugging Face
  def hf_models(self) -> list[HFModel]:
    """The transformers folders of an export; the first is the top folder."""
    return []

  def export_params(self, flat: dict[tuple, Any]) -> dict[tuple, Any]:
    """Training params {path: array} -> the params the exported folders hold."""
    return flat

  def import_params(self, flat: dict[tuple, Any]) -> dict[tuple, Any]:
    """Params read from exported folders (export_params' layout) -> training params.

    The inverse of `export_params` where one exists; `flat` holds the current
    (initialized) values for everything the checkpoint did not provide.
    """
    return flat
