"""Import Hugging Face BERT / ELECTRA / MiniLM checkpoints into any objective.

`--config.init_from=hf:PATH` (PATH: a folder with config.json and model.safetensors)
fills the objective's params through the folders it declares (`objective.hf_models()`,
the layout `amos-export` writes):
  PATH            the first (top) folder's encoder, and its head when the checkpoint
                  has one of the same kind (MLM or replaced-token detection)
  PATH/<subdir>   each other encoder (a generator), when a matching sub-folder exists:
                  '<name>' or '<name>_layer<N>' (the deepest), so an ELECTRA export's
                  `generator/` fills an AMOS generator and an AMOS export's deepest
                  `generator_layer<N>/` fills an ELECTRA one
Params shared with an encoder already filled are not read twice. The values pass
through `objective.export_params` (to the exported layout) before and
`objective.import_params` after. Anything the checkpoint lacks keeps its
initialization and is listed in the report. Encoder names and shapes are checked
strictly. Pickled `pytorch_model.bin` files are refused unless allowed, and then read
with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import glob
import json
import os
import re

import jax
import numpy as np
from flax import nnx

from amos_jax import paths
from amos_jax.errors import HFImportError, one_line
from amos_jax.hf import names

SUPPORTED_TYPES = ("bert", "electra")
RTD_HEAD_FILE = names.RTD_HEAD_FILE


def _strip(path) -> str:
  path = os.fspath(path)
  path = path[3:] if path.startswith("hf:") else path
  if not paths.is_local(path):
    return paths.local_copy(path)  # safetensors are memory-mapped: read from a local copy
  return os.path.expanduser(path)


def _unreadable(path: str, e: Exception) -> HFImportError:
  return HFImportError(f"{path} cannot be read ({type(e).__name__}: {one_line(e)[:160]}); "
                       "is it complete? Download or export it again")


def read_hf_config(path: str) -> dict:
  """config.json of a BERT/ELECTRA checkpoint, refusing what our encoder cannot run."""
  path = _strip(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise HFImportError(f"{cfg_path} not found; give a Hugging Face model folder "
                        "(config.json + model.safetensors)")
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise _unreadable(cfg_path, e) from None
  kind = cfg.get("model_type") if isinstance(cfg, dict) else None
  if kind not in SUPPORTED_TYPES:
    raise HFImportError(f"{path}: model_type={kind!r} is not supported; BERT, ELECTRA and "
                        "MiniLM-style (model_type 'bert') checkpoints are")
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise HFImportError(f"{path}: position_embedding_type="
                        f"{cfg['position_embedding_type']!r}; only absolute positions "
                        "are supported")
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise HFImportError(f"{path}: hidden_act={cfg['hidden_act']!r}; our encoder uses the "
                        "exact (erf) GELU, hidden_act='gelu'")
  return cfg


def hf_encoder_config(path: str) -> dict:
  """The `config.model` fields that reproduce the checkpoint's encoder."""
  cfg = read_hf_config(path)
  try:
    hidden = cfg["hidden_size"]
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        embedding_size=cfg.get("embedding_size", hidden),
        max_position_embeddings=cfg["max_position_embeddings"],
        type_vocab_size=cfg["type_vocab_size"],
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)))
  except KeyError as e:
    raise HFImportError(f"{_strip(path)}/config.json has no {e.args[0]!r}; is it a "
                        "BERT/ELECTRA config?") from None


def read_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """{transformers name: float32 array} from model.safetensors (or its shards)."""
  path = _strip(path)
  files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
  if files:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    out = {}
    for f in files:
      try:
        out.update(load_file(f))
      except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(f, e) from None
    return out
  pickled = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
  if not pickled:
    raise HFImportError(f"{path} holds no model.safetensors")
  if not allow_pickle:
    raise HFImportError(
        f"{path} holds only a pickled {os.path.basename(pickled[0])}; convert it to "
        "safetensors, or allow it with --config.init_from_allow_pickle=True (read with "
        "torch.load(weights_only=True))")
  import torch
  out = {}
  for f in pickled:
    try:
      state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad pickle
      raise _unreadable(f, e) from None
    for k, v in state.items():
      out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


def detect_architecture(state: dict) -> tuple[str, str | None]:
  """(base architecture for the names, head architecture or None) from the names."""
  keys = state.keys()
  if any(k.startswith("electra.") for k in keys):
    if any(k.startswith("discriminator_predictions.") for k in keys):
      return "ElectraForPreTraining", "ElectraForPreTraining"
    if any(k.startswith("generator_predictions.") for k in keys):
      return "ElectraForMaskedLM", "ElectraForMaskedLM"
    return "ElectraForPreTraining", None
  if any(k.startswith("bert.") for k in keys):
    head = "BertForMaskedLM" if any(k.startswith("cls.predictions.") for k in keys) else None
    return "BertForMaskedLM", head
  return "BertModel", None


def _check_config(hf_cfg: dict, model_cfg, where: str) -> None:
  """Sizes that do not show in tensor shapes must agree with the config."""
  want = dict(num_heads=hf_cfg["num_attention_heads"],
              layer_norm_eps=float(hf_cfg.get("layer_norm_eps", 1e-12)))
  for field, value in want.items():
    if float(getattr(model_cfg, field)) != float(value):
      raise HFImportError(f"{where}: model.{field}={getattr(model_cfg, field)} but the "
                          f"checkpoint has {value}; set --config.model.{field}={value} "
                          "(configs/continue.py reads it from the checkpoint)")
  if getattr(model_cfg, "relative_attention_buckets", 0):
    raise HFImportError("model.relative_attention_buckets is set, which transformers "
                        "checkpoints do not have; set it to 0")


def _fill(values: dict, loaded: set, state: dict, view: dict, table: dict, where: str,
          strict: tuple = ()) -> set:
  """Copies checkpoint tensors into `values` (export layout) through one folder's view.

  view: {view path: our path} (`names.model_view`); our paths already in `loaded` are
  skipped (a shared block is read once). View paths under `strict` must all be
  present with the right shape, else one error naming them. Returns the names used.
  """
  used, missing, mismatched = set(), [], []
  for vpath, path in view.items():
    if path in loaded:
      continue
    named = names.hf_name(vpath, table)
    if named is None:
      continue
    name, transpose = named
    if name not in state:
      if any(vpath[:len(p)] == p for p in strict):
        missing.append(name)
      continue
    value = np.asarray(state[name], np.float32)
    value = value.T if transpose else value
    if value.shape != tuple(np.shape(values[path])):
      mismatched.append(f"{name} {tuple(value.shape)} vs ours {tuple(np.shape(values[path]))}")
      continue
    values[path] = value
    loaded.add(path)
    used.add(name)
  if missing or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}...)")
    if mismatched:
      parts.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:3])})")
    raise HFImportError(
        f"{where} does not fit the configured model: {'; '.join(parts)}. Set the model "
        "size from the checkpoint (configs/continue.py does, via hf_encoder_config)")
  return used


def _place(value: np.ndarray, var) -> jax.Array:
  """The value with the dtype and sharding of the parameter it replaces."""
  old = var[...]
  value = np.asarray(value).astype(old.dtype)
  sharding = getattr(old, "sharding", None)
  if sharding is None:
    return jax.numpy.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _unexpected(state: dict, used: set, base_prefix: str) -> list:
  """Checkpoint names of the base model that nothing consumed: a layout we do not know."""
  extra = []
  for k in state:
    if k in used or names.IGNORABLE.search(k):
      continue
    if base_prefix and not k.startswith(base_prefix):
      continue
    if not base_prefix and any(k.startswith(p) for p in ("cls.", "generator_",
                                                         "discriminator_")):
      continue
    extra.append(k)
  return extra


def _read_folder(values: dict, loaded: set, folder: str, model, allow_pickle: bool, *,
                 top: bool) -> tuple[str, str | None, list]:
  """Fills one HFModel's params from one folder. Returns (base architecture, head
  architecture, unused checkpoint names)."""
  hf_cfg = read_hf_config(folder)
  _check_config(hf_cfg, model.encoder_config, folder)
  state = read_state_dict(folder, allow_pickle)
  base_arch, head_arch = detect_architecture(state)
  view = names.model_view(values, model)
  table = names.layout(base_arch, names.VIEW_ENCODER)
  one_layer = names.one_layer_rtd(model.arch, view)
  # A head fills ours when it is of the same kind; transformers' RTD head has two
  # layers, so a one-layer head reads its own file instead.
  if (model.head is not None and head_arch is not None and not one_layer
      and names.head_family(head_arch) == names.head_family(model.arch)):
    table.update(names.layout(head_arch, names.VIEW_ENCODER, names.VIEW_HEAD))
  used = _fill(values, loaded, state, view, table, folder, strict=(names.VIEW_ENCODER,))
  if top:
    extra = _unexpected(state, used, names.BASE_PREFIX[base_arch])
    if extra:
      raise HFImportError(f"{folder} has {len(extra)} encoder weights our model has no "
                          f"place for ({', '.join(extra[:4])}); is it a BERT/ELECTRA "
                          "encoder of the configured size?")
  rtd_file = os.path.join(folder, RTD_HEAD_FILE)
  if one_layer and os.path.isfile(rtd_file):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      rtd_state = load_file(rtd_file)
    except (SafetensorError, OSError, ValueError) as e:
      raise _unreadable(rtd_file, e) from None
    head = {v: p for v, p in view.items() if v[:2] == names.VIEW_HEAD + ("dense_prediction",)}
    _fill(values, loaded, rtd_state, head,
          {names.VIEW_HEAD + ("dense_prediction",): "dense_prediction"}, rtd_file)
  return base_arch, head_arch, sorted(k for k in state if k not in used)


def _family(subdir: str) -> str:
  """'generator_layer4' -> 'generator': the folders one encoder can be read from."""
  return re.sub(r"_layer\d+$", "", subdir)


def _depth(folder: str) -> int:
  try:
    return int(read_hf_config(folder).get("num_hidden_layers", 0))
  except (TypeError, ValueError):
    return 0


def _sub_folder(path: str, models: list) -> tuple[str, object] | None:
  """(folder, HFModel) that fills one non-top encoder root, or None.

  models: the HFModels of that root. A folder qualifies when its name is one of
  theirs up to a `_layer<N>` suffix; the deepest one wins (it fills the most blocks),
  read with the HFModel of its depth (else the deepest HFModel).
  """
  families = {_family(m.subdir) for m in models}
  found = []
  for entry in sorted(os.listdir(path)):
    folder = os.path.join(path, entry)
    if _family(entry) in families and os.path.isfile(os.path.join(folder, "config.json")):
      found.append((_depth(folder), entry, folder))
  if not found:
    return None
  depth, entry, folder = max(found)
  depth_of = lambda m: m.num_layers or m.encoder_config.num_layers
  model = (next((m for m in models if m.subdir == entry), None)
           or next((m for m in models if depth_of(m) == depth), None)
           or max(models, key=depth_of))
  return folder, model


def init_params_from_hf(path: str, params_state: nnx.State,
                        objective) -> tuple[nnx.State, dict]:
  """Fills an objective's params from a Hugging Face checkpoint folder.

  path: 'hf:DIR' or DIR. params_state: `nnx.split(model, nnx.Param)[1]` (arrays may
  be sharded; the imported values keep each parameter's sharding and dtype).
  objective: the run's `Objective` (its folders, param layout and
  `config.init_from_allow_pickle`).
  Returns (params_state, report) where report = {source, architecture, head, folders,
  loaded, initialized, ignored}: the sub-folders read, how many of our params were
  filled, our paths left at their init, and the checkpoint names not used.
  """
  path = _strip(path)
  allow_pickle = bool(objective.config.get("init_from_allow_pickle", False))
  models = objective.hf_models()
  if not models:
    raise HFImportError(f"objective {objective.name!r} declares no Hugging Face layout "
                        f"(hf_models); it cannot start from {path}")
  flat = dict(nnx.to_flat_state(params_state))
  init = {p: var[...] for p, var in flat.items()}
  values = dict(objective.export_params(dict(init)))
  loaded: set = set()

  top, subs = models[0], models[1:]
  base_arch, head_arch, ignored = _read_folder(values, loaded, path, top, allow_pickle,
                                               top=True)
  folders = []
  for root in dict.fromkeys(m.encoder for m in subs):
    if not any(p[0] == root for p in values):
      continue
    found = _sub_folder(path, [m for m in subs if m.encoder == root])
    if found is None:
      continue
    folder, model = found
    *_, unused = _read_folder(values, loaded, folder, model, allow_pickle, top=False)
    rel = os.path.relpath(folder, path)
    folders.append(rel)
    ignored += [f"{rel}/{k}" for k in unused]

  # Back to the training layout; a value import_params did not replace kept its init.
  params = objective.import_params(values)
  filled = set()
  for p, var in flat.items():
    value = params.get(p, init[p])
    if value is not init[p]:
      flat[p] = var.replace(_place(value, var))
      filled.add(p)
  report = dict(
      source=path, architecture=base_arch, head=head_arch, folders=folders,
      loaded=len(filled),
      initialized=sorted("/".join(map(str, p)) for p in flat if p not in filled),
      ignored=ignored)
  return nnx.from_flat_state(list(flat.items())), report


def format_report(report: dict) -> str:
  """A few log lines: what came from the checkpoint and what kept its init."""
  init = report["initialized"]
  modules = sorted({"/".join(p.split("/")[:2]) for p in init})
  folders = report.get("folders") or []
  lines = [f"init_from {report['source']} ({report['architecture']}"
           + (f"; with {', '.join(folders)}" if folders else "")
           + f"): {report['loaded']} tensors loaded"]
  if init:
    lines.append(f"  kept their initialization ({len(init)} tensors): "
                 f"{', '.join(modules)}")
  if report["ignored"]:
    lines.append(f"  unused checkpoint tensors: {', '.join(report['ignored'][:8])}"
                 + (" ..." if len(report["ignored"]) > 8 else ""))
  return "\n".join(lines)
