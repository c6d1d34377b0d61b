"""The one table between our parameter paths and Hugging Face `transformers` names.

Our encoder's attribute paths already mirror `BertModel` / `ElectraModel`, so a name
is the module path joined with '.', a prefix swapped, and the leaf renamed:

  ours (nnx path)                                   transformers
  <enc>/embeddings/word_embeddings/embedding        <base>embeddings.word_embeddings.weight
  <enc>/encoder/layer/3/attention/self/query/kernel <base>encoder.layer.3.attention.self.query.weight (transposed)
  <enc>/embeddings/LayerNorm/scale                  <base>embeddings.LayerNorm.weight

nnx.Linear kernels are (in, out); torch.nn.Linear weights are (out, in). Heads are
listed below per architecture. Both export (`export.py`) and import (`load.py`) use
`layout()` and `hf_name()`; nothing else spells a transformers name.
"""
from __future__ import annotations

import re

# Our leaf -> (transformers leaf, transpose?)
LEAF = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "scale": ("weight", False),
    "bias": ("bias", False),
}

# The base-model attribute of each transformers architecture ('' = a bare model).
BASE_PREFIX = {
    "BertModel": "",
    "ElectraModel": "",
    "BertForMaskedLM": "bert.",
    "ElectraForMaskedLM": "electra.",
    "ElectraForPreTraining": "electra.",
}

# Head sub-module -> transformers module (or, for a bare parameter, the full name).
MLM_HEAD = {
    "BertForMaskedLM": {
        "dense": "cls.predictions.transform.dense",
        "LayerNorm": "cls.predictions.transform.LayerNorm",
        "bias": "cls.predictions.bias",
    },
    "ElectraForMaskedLM": {
        "dense": "generator_predictions.dense",
        "LayerNorm": "generator_predictions.LayerNorm",
        "bias": "generator_lm_head.bias",
    },
}
RTD_HEAD = {
    "ElectraForPreTraining": {
        "dense": "discriminator_predictions.dense",
        "dense_prediction": "discriminator_predictions.dense_prediction",
    },
}
HEADS = {**MLM_HEAD, **RTD_HEAD}

# transformers names that carry no information of their own: tied copies of the
# word embeddings / vocabulary bias, buffers, and heads no objective here uses.
IGNORABLE = re.compile(
    r"(^|\.)(position_ids|token_type_ids)$"
    r"|^(bert\.)?pooler\."
    r"|^cls\.seq_relationship\."
    r"|^cls\.predictions\.decoder\.(weight|bias)$"
    r"|^generator_lm_head\.weight$")


def layout(arch: str, encoder: tuple = ("encoder",), head: tuple | None = None) -> dict:
  """{our path prefix: transformers prefix or full name} for one architecture.

  encoder: where the encoder sits in our params (('encoder',), ('discriminator',)).
  head: where the architecture's head sits in our params, or None to leave it out.
  """
  table = {tuple(encoder): BASE_PREFIX[arch]}
  if head is not None:
    for ours, theirs in HEADS[arch].items():
      table[tuple(head) + (ours,)] = theirs
  return table


def hf_name(path: tuple, table: dict) -> tuple[str, bool] | None:
  """Our flat path -> (transformers name, transpose?), or None if the table has no
  prefix for it (e.g. AMOS's mixture scorer, which exists only during training)."""
  best = None
  for prefix in table:
    if path[:len(prefix)] == prefix and (best is None or len(prefix) > len(best)):
      best = prefix
  if best is None:
    return None
  rest = [str(p) for p in path[len(best):]]
  base = table[best]
  if not rest:  # a bare parameter (the MLM head's vocabulary bias): full name given
    return base, False
  leaf, transpose = LEAF[rest[-1]]
  parts = ([base.rstrip(".")] if base else []) + rest[:-1] + [leaf]
  return ".".join(parts), transpose


def to_hf(flat: dict, table: dict) -> dict:
  """{our path: array} -> {transformers name: array (kernels transposed)}.

  Paths the table does not cover are left out; see `hf_name`.
  """
  out = {}
  for path, value in flat.items():
    named = hf_name(path, table)
    if named is None:
      continue
    name, transpose = named
    out[name] = value.T if transpose else value
  return out
