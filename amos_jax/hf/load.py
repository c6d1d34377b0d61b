"""Import Hugging Face BERT / ELECTRA / MiniLM checkpoints into any objective.

`--config.init_from=hf:PATH` (PATH: a folder with config.json and model.safetensors)
fills the objective's encoder from the checkpoint:
  mlm            encoder <- the base model; mlm_head <- its MLM head, if it has one
  electra, amos  discriminator <- the base model; discriminator_head <- its RTD head;
                 generator (+ head) <- PATH/generator or the deepest
                 PATH/generator_layer<N>, as `amos-export` writes them
Anything the checkpoint lacks keeps its initialization and is listed in the report.
Encoder names and shapes are checked strictly. Pickled `pytorch_model.bin` files are
refused unless allowed, and then read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
from flax import nnx

from amos_jax.hf import names

SUPPORTED_TYPES = ("bert", "electra")
RTD_HEAD_FILE = "amos_rtd_head.safetensors"


class HFImportError(SystemExit):
  """A checkpoint that cannot be imported; the message names the problem and the fix."""

  def __init__(self, message: str):
    super().__init__(f"error: init_from: {message}")


def _strip(path) -> str:
  path = os.fspath(path)
  path = path[3:] if path.startswith("hf:") else path
  return os.path.expanduser(path)


def read_hf_config(path: str) -> dict:
  """config.json of a BERT/ELECTRA checkpoint, refusing what our encoder cannot run."""
  path = _strip(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise HFImportError(f"{cfg_path} not found; give a Hugging Face model folder "
                       "(config.json + model.safetensors)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  kind = cfg.get("model_type")
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
  hidden = cfg["hidden_size"]
  return dict(
      vocab_size=cfg["vocab_size"], hidden_size=hidden,
      num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
      intermediate_size=cfg["intermediate_size"],
      embedding_size=cfg.get("embedding_size", hidden),
      max_position_embeddings=cfg["max_position_embeddings"],
      type_vocab_size=cfg["type_vocab_size"],
      layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)))


def read_state_dict(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """{transformers name: float32 array} from model.safetensors (or its shards)."""
  path = _strip(path)
  files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
  if files:
    from safetensors.numpy import load_file
    out = {}
    for f in files:
      out.update(load_file(f))
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
    for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
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


def _fill(flat: dict, state: dict, table: dict, prefixes: tuple, where: str,
          strict: tuple = (), skip: tuple = ()) -> tuple[list, set]:
  """Copies checkpoint tensors into `flat` for our paths under `prefixes`.

  Paths under `strict` must all be present with the right shape (else one error
  naming them); others are optional. Returns (loaded paths, used names).
  """
  loaded, used, missing, mismatched = [], set(), [], []
  for path, var in flat.items():
    if not any(path[:len(p)] == p for p in prefixes) or any(
        path[:len(p)] == p for p in skip):
      continue
    named = names.hf_name(path, table)
    if named is None:
      continue
    name, transpose = named
    if name not in state:
      if any(path[:len(p)] == p for p in strict):
        missing.append(name)
      continue
    value = np.asarray(state[name], np.float32)
    value = value.T if transpose else value
    if value.shape != tuple(var.shape):
      mismatched.append(f"{name} {tuple(value.shape)} vs ours {tuple(var.shape)}")
      continue
    flat[path] = var.replace(_place(value, var))
    loaded.append(path)
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
  return loaded, used


def _place(value: np.ndarray, var) -> jax.Array:
  """The value with the dtype and sharding of the parameter it replaces."""
  old = var[...]
  value = value.astype(old.dtype)
  sharding = getattr(old, "sharding", None)
  if sharding is None:
    return jax.numpy.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _unexpected(state: dict, used: set, base_prefix: str, head_arch: str | None) -> list:
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


def _generator_dir(path: str) -> str | None:
  if os.path.isfile(os.path.join(path, "generator", "config.json")):
    return os.path.join(path, "generator")
  taps = glob.glob(os.path.join(path, "generator_layer*", "config.json"))
  if taps:
    return os.path.dirname(max(taps, key=lambda p: int(
        os.path.basename(os.path.dirname(p))[len("generator_layer"):])))
  return None


def init_params_from_hf(path: str, params_state: nnx.State, config, *,
                        allow_pickle: bool | None = None) -> tuple[nnx.State, dict]:
  """Fills an objective's params from a Hugging Face checkpoint folder.

  path: 'hf:DIR' or DIR. params_state: `nnx.split(model, nnx.Param)[1]` (arrays may
  be sharded; the imported values keep each parameter's sharding and dtype).
  Returns (params_state, report) where report = {source, architecture, loaded,
  initialized, ignored}: our paths filled, our paths left at their init, and the
  checkpoint names not used.
  """
  from amos_jax.model.encoder import EncoderConfig
  path = _strip(path)
  if allow_pickle is None:
    allow_pickle = bool(config.get("init_from_allow_pickle", False))
  hf_cfg = read_hf_config(path)
  state = read_state_dict(path, allow_pickle)
  base_arch, head_arch = detect_architecture(state)
  flat = dict(nnx.to_flat_state(params_state))
  roots = {p[0] for p in flat}
  objective = config.objective.name
  model_cfg = EncoderConfig.from_config(config.model)
  _check_config(hf_cfg, model_cfg, path)

  encoder = ("encoder",) if "encoder" in roots else ("discriminator",)
  head = ("mlm_head",) if objective == "mlm" else ("discriminator_head",)
  table = names.layout(base_arch, encoder)
  # transformers' RTD head has two layers; a one-layer head (AMOS) reads its own file.
  two_layer_rtd = head + ("dense", "kernel") in flat
  if head_arch is not None:
    wanted = names.MLM_HEAD if objective == "mlm" else names.RTD_HEAD
    if head_arch in wanted and (objective == "mlm" or two_layer_rtd):
      table.update(names.layout(head_arch, encoder, head))
  loaded, used = _fill(flat, state, table, (encoder, head), path, strict=(encoder,))
  extra = _unexpected(state, used, names.BASE_PREFIX[base_arch], head_arch)
  if extra:
    raise HFImportError(f"{path} has {len(extra)} encoder weights our model has no place "
                       f"for ({', '.join(extra[:4])}); is it a BERT/ELECTRA encoder of "
                       "the configured size?")
  ignored = sorted(k for k in state if k not in used)

  # AMOS's one-layer RTD head travels next to the two-layer transformers head.
  rtd_file = os.path.join(path, RTD_HEAD_FILE)
  if head == ("discriminator_head",) and not two_layer_rtd and os.path.isfile(rtd_file):
    from safetensors.numpy import load_file
    extra_state = load_file(rtd_file)
    got, _ = _fill(flat, extra_state, {head + ("dense_prediction",): "dense_prediction"},
                   (head,), rtd_file)
    loaded += got

  if objective in ("electra", "amos") and "generator" in roots:
    gen_dir = _generator_dir(path)
    if gen_dir is not None:
      from amos_jax.objectives.electra import generator_config
      gen_hf = read_hf_config(gen_dir)
      _check_config(gen_hf, generator_config(config), gen_dir)
      gen_state = read_state_dict(gen_dir, allow_pickle)
      gen_arch, gen_head = detect_architecture(gen_state)
      table = names.layout(gen_arch, ("generator",))
      if gen_head == "ElectraForMaskedLM":
        table.update(names.layout(gen_head, ("generator",), ("generator_head",)))
      # The embedding block is shared with the discriminator (already loaded).
      got, _ = _fill(flat, gen_state, table, (("generator",), ("generator_head",)),
                     gen_dir, strict=(("generator",),))
      loaded += got

  loaded_set = set(loaded)
  report = dict(
      source=path, architecture=base_arch, head=head_arch,
      loaded=len(loaded_set),
      initialized=sorted("/".join(map(str, p)) for p in flat if p not in loaded_set),
      ignored=ignored)
  return nnx.from_flat_state(list(flat.items())), report


def format_report(report: dict) -> str:
  """A few log lines: what came from the checkpoint and what kept its init."""
  init = report["initialized"]
  modules = sorted({"/".join(p.split("/")[:2]) for p in init})
  lines = [f"init_from {report['source']} ({report['architecture']}): "
           f"{report['loaded']} tensors loaded"]
  if init:
    lines.append(f"  kept their initialization ({len(init)} tensors): "
                 f"{', '.join(modules)}")
  if report["ignored"]:
    lines.append(f"  unused checkpoint tensors: {', '.join(report['ignored'][:8])}"
                 + (" ..." if len(report["ignored"]) > 8 else ""))
  return "\n".join(lines)
