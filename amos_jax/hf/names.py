"""The one table between our parameter paths and Hugging Face `transformers` names.

Our encoder's attribute paths already mirror `BertModel` / `ElectraModel`, so a name
is the module path joined with '.', a prefix swapped, and the leaf renamed:

  ours (nnx path)                                   transformers
  <enc>/embeddings/word_embeddings/embedding        <base>embeddings.word_embeddings.weight
  <enc>/encoder/layer/3/attention/self/query/kernel <base>encoder.layer.3.attention.self.query.weight (transposed)
  <enc>/embeddings/LayerNorm/scale                  <base>embeddings.LayerNorm.weight

nnx.Linear kernels are (in, out); torch.nn.Linear weights are (out, in). Heads are
listed below per architecture. An exported folder (an objective's `HFModel`) is seen
through `model_view()`: its encoder under ('encoder', ...), its head under
('head', ...). Both export (`export.py`) and import (`load.py`) use `model_view()`,
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

# A one-layer RTD head (Dense(H->1), AMOS's) travels in this file next to the
# two-layer transformers head that computes it exactly (see export.one_layer_rtd_as_two).
RTD_HEAD_FILE = "amos_rtd_head.safetensors"

# Where a folder's encoder and head sit in its view (see `model_view`).
VIEW_ENCODER = ("encoder",)
VIEW_HEAD = ("head",)

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
  if rest[-1] not in LEAF:  # e.g. GDES's word_embeddings_delta: no transformers name
    return None
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


def head_family(arch: str | None) -> str | None:
  """'mlm', 'rtd' or None (a bare encoder): heads of one family fill each other."""
  if arch in MLM_HEAD:
    return "mlm"
  if arch in RTD_HEAD:
    return "rtd"
  return None


def model_view(flat: dict, model) -> dict[tuple, tuple]:
  """{view path: our path} of the params one exported folder holds.

  model: an objective's `HFModel`. Its encoder root appears under ('encoder', ...),
  cut to the first `num_layers` blocks; embedding params it lacks come from the
  `shared_embeddings` root (ELECTRA's generator reads the discriminator's block,
  AMOS's only the token matrix); its head root appears under ('head', ...).
  flat: {our path: value} in `export_params` layout.
  """
  view = {}
  for path in flat:
    if path[0] == model.encoder:
      rest = tuple(path[1:])
      if (model.num_layers is not None and rest[:2] == ("encoder", "layer")
          and int(rest[2]) >= model.num_layers):
        continue
      view[VIEW_ENCODER + rest] = path
    elif model.head is not None and path[0] == model.head:
      view[VIEW_HEAD + tuple(path[1:])] = path
  if model.shared_embeddings is not None:
    for path in flat:
      if path[:2] == (model.shared_embeddings, "embeddings"):
        view.setdefault(VIEW_ENCODER + tuple(path[1:]), path)
  return view


def one_layer_rtd(arch: str, view: dict) -> bool:
  """True for an RTD head with only `dense_prediction` (Dense(H->1)), which
  transformers' two-layer head holds only through `export.one_layer_rtd_as_two`."""
  return (head_family(arch) == "rtd" and VIEW_HEAD + ("dense_prediction", "kernel") in view
          and VIEW_HEAD + ("dense", "kernel") not in view)
