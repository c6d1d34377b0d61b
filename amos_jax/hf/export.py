"""amos-export --workdir DIR --out OUT [--step N] --format hf|sentence-transformers

Writes a run's checkpoint as folders that `transformers` (and `sentence-transformers`)
load with `from_pretrained` and no custom code. The run's objective says which
(`objective.hf_models()`): OUT holds the first, each other one a sub-folder, e.g.
  mlm      OUT: BertForMaskedLM (ElectraForMaskedLM when embedding_size != hidden_size)
  electra  OUT: ElectraForPreTraining; OUT/generator: ElectraForMaskedLM
  amos     OUT: ElectraForPreTraining; OUT/generator_layer<l>: the shared MLM head read
           after l blocks, one complete ElectraForMaskedLM per tapped depth
The params pass through `objective.export_params` first (GDES writes E_G + E_delta).
  --format sentence-transformers: the top folder's encoder + pooling + normalize;
           `--size L,D` keeps the first L layers and the first D dimensions.
Every folder gets the tokenizer (tokenizer.json) and a model-card README.md. OUT is
written whole or not at all, outside the run, and never over a folder amos-export
did not write (an earlier export, listed in its amos_export.json, is replaced).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from amos_jax import paths
from amos_jax.errors import ExportError
from amos_jax.hf import names
from amos_jax.hf.output import check_out, write_out
from amos_jax.hf.tokenizer_export import save_hf_tokenizer

# ------------------------------------------------------------------ reading a run
def load_run(workdir: str, step: int | None = None):
  """(config, {our path: float32 array}, step) of a run's checkpoint.

  Reads only the `state` item's params, whatever else the checkpoint holds.
  """
  import ml_collections
  import orbax.checkpoint as ocp
  cfg_path = paths.join(workdir, "config.json")
  if not paths.exists(cfg_path) or paths.isdir(cfg_path):
    raise ExportError(f"{cfg_path} not found; --workdir must be an amos-train run directory")
  config = ml_collections.ConfigDict(paths.read_json(cfg_path))
  ckpt_dir = paths.as_path(workdir) / "checkpoints"
  if paths.is_local(ckpt_dir):
    ckpt_dir = paths.as_path(os.path.abspath(ckpt_dir))
  steps = sorted(int(p.name) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
                 if p.name.isdigit())
  if not steps:
    raise ExportError(f"no checkpoint in {ckpt_dir}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ExportError(f"--step {step} not found; available: {steps}")
  tree = ocp.StandardCheckpointer().restore(ckpt_dir / str(step) / "state")
  flat = {}

  def walk(node, path):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, path + (int(k) if isinstance(k, str) and k.isdigit() else k,))
    else:
      flat[path] = np.asarray(node, np.float32)

  walk(tree["params"], ())
  # nnx.Variable leaves may be saved with a trailing 'value' key.
  flat = {(p[:-1] if p[-1] == "value" else p): v for p, v in flat.items()}
  return config, flat, step


def load_run_tokenizer(workdir: str, config):
  from amos_jax.data.tokenizer import load_tokenizer
  own = paths.join(workdir, "tokenizer")
  spec = own if paths.isdir(own) else config.data.get("tokenizer", "")
  if not spec:
    raise ExportError(f"no tokenizer: {own} is missing and data.tokenizer is empty")
  return load_tokenizer(spec)


# ------------------------------------------------------------- transformers files
def hf_config(arch: str, enc, *, num_layers: int, pad_id: int) -> dict:
  """transformers config.json for one of our encoders (enc: its EncoderConfig)."""
  bert = arch.startswith("Bert")
  cfg = dict(
      architectures=[arch], model_type="bert" if bert else "electra",
      vocab_size=int(enc.vocab_size), hidden_size=int(enc.hidden_size),
      num_hidden_layers=int(num_layers), num_attention_heads=int(enc.num_heads),
      intermediate_size=int(enc.intermediate_size), hidden_act="gelu",
      hidden_dropout_prob=float(enc.hidden_dropout),
      attention_probs_dropout_prob=float(enc.attention_dropout),
      max_position_embeddings=int(enc.max_position_embeddings),
      type_vocab_size=int(enc.type_vocab_size),
      initializer_range=float(enc.initializer_range),
      layer_norm_eps=float(enc.layer_norm_eps), pad_token_id=int(pad_id),
      position_embedding_type="absolute", tie_word_embeddings=True)
  if not bert:
    cfg["embedding_size"] = int(enc.embed_size)
  return cfg


def write_model(out: str, tensors: dict, config: dict) -> None:
  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def one_layer_rtd_as_two(w: np.ndarray, b: np.ndarray) -> dict:
  """A one-layer RTD head Dense(H->1) as transformers' dense -> GELU ->
  dense_prediction, exactly.

  gelu(z) - gelu(-z) = z Phi(z) + z (1 - Phi(z)) = z, so with rows (w, -w) in the
  first dense and (1, -1) in the second, the two-layer head computes w.x + b.
  w: (H, 1) kernel, b: (1,). Returns {view path: array} for the two-layer head.
  """
  h = w.shape[0]
  if h < 2:
    raise ExportError("a width-1 discriminator cannot hold the one-layer RTD head")
  dense = np.zeros((h, h), np.float32)
  dense[:, 0], dense[:, 1] = w[:, 0], -w[:, 0]
  pred = np.zeros((h, 1), np.float32)
  pred[0, 0], pred[1, 0] = 1.0, -1.0
  head = names.VIEW_HEAD
  return {head + ("dense", "kernel"): dense, head + ("dense", "bias"): np.zeros(h, np.float32),
          head + ("dense_prediction", "kernel"): pred,
          head + ("dense_prediction", "bias"): np.asarray(b, np.float32)}


def folder_tensors(flat: dict, model) -> tuple[dict, dict | None]:
  """({transformers name: array} of one HFModel's folder, the one-layer RTD head's
  own tensors or None). flat: {our path: array} in export layout."""
  if model.arch not in names.BASE_PREFIX:
    raise ExportError(f"{model.arch} is not an architecture amos-export writes; "
                      f"amos_jax/hf/names.py knows {', '.join(names.BASE_PREFIX)}")
  view = names.model_view(flat, model)
  values = {v: flat[p] for v, p in view.items()}
  rtd = None
  if names.one_layer_rtd(model.arch, view):
    w = values[names.VIEW_HEAD + ("dense_prediction", "kernel")]
    b = values[names.VIEW_HEAD + ("dense_prediction", "bias")]
    rtd = {"dense_prediction.weight": np.ascontiguousarray(np.asarray(w).T),
           "dense_prediction.bias": np.asarray(b)}
    values = {v: x for v, x in values.items() if v[:1] != names.VIEW_HEAD}
    values.update(one_layer_rtd_as_two(np.asarray(w), np.asarray(b)))
  table = names.layout(model.arch, names.VIEW_ENCODER,
                       names.VIEW_HEAD if model.head is not None else None)
  tensors = {}
  for vpath, value in values.items():
    named = names.hf_name(vpath, table)
    if named is None:  # a param no transformers class holds: exporting would drop it
      ours = "/".join(map(str, view.get(vpath, vpath)))
      raise ExportError(f"{ours} has no {model.arch} name; the objective's export_params "
                        "must fold it into exported params")
    name, transpose = named
    tensors[name] = np.asarray(value).T if transpose else np.asarray(value)
  return tensors, rtd


def _depth(model) -> int:
  return int(model.num_layers or model.encoder_config.num_layers)


def write_folder(out: str, model, flat: dict, tok, card) -> str:
  """One HFModel as a transformers folder: weights, config, tokenizer, model card."""
  tensors, rtd = folder_tensors(flat, model)
  cfg = hf_config(model.arch, model.encoder_config, num_layers=_depth(model),
                  pad_id=tok.pad_id)
  write_model(out, tensors, cfg)
  if rtd is not None:
    from safetensors.numpy import save_file
    save_file(rtd, os.path.join(out, names.RTD_HEAD_FILE), metadata={"format": "pt"})
  save_hf_tokenizer(tok, out, cfg["max_position_embeddings"])
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(card(model.arch, model.role or model.arch, model.encoder_config, _depth(model),
                 one_layer_rtd=rtd is not None))
  return out


def export_hf(models: list, flat: dict, tok, out: str, card) -> list[str]:
  """Writes every HFModel's folder under `out`; returns their paths."""
  return [write_folder(os.path.join(out, m.subdir) if m.subdir else out, m, flat, tok, card)
          for m in models]


# ----------------------------------------------------------- sentence-transformers
def export_sentence_transformers(model, flat: dict, tok, out: str, card, *,
                                 seq_len: int, size: tuple[int, int] | None = None,
                                 pooling: str = "mean", normalize: bool = True) -> str:
  """model's encoder (first L layers) -> Pooling -> [Dense keeping the first D dims]
  -> [Normalize]; cosine similarity. model: the top HFModel."""
  enc = model.encoder_config
  h, depth = int(enc.hidden_size), int(enc.num_layers)
  layers, dim = (depth, h) if size is None else size
  if not (1 <= layers <= depth and 1 <= dim <= h):
    raise ExportError(f"--size {layers},{dim} is outside the model ({depth} layers, "
                      f"width {h})")
  arch = "BertModel" if enc.embed_size == h else "ElectraModel"
  encoder = dataclasses.replace(model, subdir="", arch=arch, head=None, num_layers=layers,
                                role=f"a sentence embedding model: layer {layers}, "
                                f"{dim} dimensions, {pooling} pooling")
  write_folder(out, encoder, flat, tok, card)
  modules = [dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer")]
  os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
  with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": h, "pooling_mode_cls_token": pooling == "cls",
               "pooling_mode_mean_tokens": pooling == "mean",
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
               "include_prompt": True}, f, indent=2)
  modules.append(dict(idx=1, name="1", path="1_Pooling",
                      type="sentence_transformers.models.Pooling"))
  if dim < h:
    # A fixed identity slice: the 2D-Matryoshka size keeps the first `dim` coordinates.
    from safetensors.numpy import save_file
    d = os.path.join(out, f"{len(modules)}_Dense")
    os.makedirs(d, exist_ok=True)
    save_file({"linear.weight": np.eye(h, dtype=np.float32)[:dim]},
              os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({"in_features": h, "out_features": dim, "bias": False,
                 "activation_function": "torch.nn.modules.linear.Identity"}, f, indent=2)
    modules.append(dict(idx=len(modules), name=str(len(modules)), path=os.path.basename(d),
                        type="sentence_transformers.models.Dense"))
  if normalize:
    modules.append(dict(idx=len(modules), name=str(len(modules)),
                        path=f"{len(modules)}_Normalize",
                        type="sentence_transformers.models.Normalize"))
  with open(os.path.join(out, "modules.json"), "w") as f:
    json.dump(modules, f, indent=2)
  with open(os.path.join(out, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": int(seq_len), "do_lower_case": False}, f)
  with open(os.path.join(out, "config_sentence_transformers.json"), "w") as f:
    json.dump({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None},
              f, indent=2)
  return out


# ------------------------------------------------------------------ model card
def model_card(config, workdir: str, step: int):
  """A function (arch, what, encoder config, layers, one_layer_rtd) -> README.md text
  for one exported folder."""
  o = config.objective
  last = {}
  metrics = paths.join(workdir, "metrics.jsonl")
  for line in paths.read_text(metrics).splitlines() if paths.exists(metrics) else []:
    if line.strip():
      try:
        last.update(json.loads(line))
      except ValueError:  # a torn last line of an interrupted run
        pass
  shown = {k: round(v, 4) for k, v in last.items()
           if isinstance(v, float) and ("loss" in k or "accuracy" in k)}
  taps = tuple(o.get("generator", {}).get("tap_layers", ()) or ())

  def card(arch: str, what: str, enc, layers: int, one_layer_rtd: bool = False) -> str:
    lines = [
        f"# {o.name} encoder ({arch})", "",
        f"Exported by `amos-export`: {what}.", "",
        f"- objective: {o.name}" + (f" (taps {taps})" if taps else ""),
        f"- sizes: {layers} layers, hidden {enc.hidden_size}, {enc.num_heads} heads, "
        f"intermediate {enc.intermediate_size}, embedding {enc.embed_size}, "
        f"vocabulary {enc.vocab_size}",
        f"- training steps: {step} of {config.train.steps} (batch {config.train.batch_size}"
        f" x {config.train.seq_len} tokens)",
        f"- data: {config.data.get('prepared') or config.data.get('corpus')}"
        + (f"; initialized from {config.init_from}" if config.get("init_from") else ""),
        f"- metrics at the last logged step: {json.dumps(shown) if shown else 'none logged'}",
    ]
    if one_layer_rtd:
      lines += ["", "The replaced-token-detection head is one Dense(H->1). transformers' "
                "head is dense -> GELU -> dense_prediction; it holds the one-layer head "
                "exactly (rows (w, -w), then (1, -1): gelu(z) - gelu(-z) = z). The "
                f"original weights are also in `{names.RTD_HEAD_FILE}`."]
    return "\n".join(lines) + "\n"

  return card


# ------------------------------------------------------------------------- CLI
def export(workdir: str, out: str, fmt: str = "hf", step: int | None = None,
           size: tuple[int, int] | None = None, pooling: str | None = None) -> list[str]:
  """Exports a run; returns the folders written."""
  from amos_jax.objectives import get_objective
  from amos_jax.objectives.base import SpecialTokens
  if fmt not in ("hf", "sentence-transformers"):
    raise ExportError(f"--format {fmt!r}: use hf or sentence-transformers")
  if fmt == "hf" and (size is not None or pooling is not None):
    flag = "--size" if size is not None else "--pooling"
    raise ExportError(f"{flag} applies to --format sentence-transformers; --format hf "
                      "writes the whole model")
  if not paths.is_local(out):
    raise ExportError(f"--out {out}: exports are written to a local folder; give a "
                      "local --out and copy it up (gcloud storage cp -r OUT gs://...)")
  target = check_out(workdir, out)
  config, flat, step = load_run(workdir, step)
  tok = load_run_tokenizer(workdir, config)
  objective = get_objective(config, SpecialTokens.of(tok))
  models = objective.hf_models()
  if not models:
    raise ExportError(f"objective {config.objective.name!r} declares no transformers "
                      "folders (hf_models)")
  if fmt == "sentence-transformers":
    models = models[:1]
  for m in models:
    if m.encoder_config.relative_attention_buckets:
      raise ExportError(
          "this model uses a relative position bias (model.relative_attention_buckets="
          f"{m.encoder_config.relative_attention_buckets}), which stock transformers "
          "BERT/ELECTRA cannot express; a folder that loads would compute something else")
  flat = objective.export_params(flat)
  card = model_card(config, workdir, step)

  def write(folder: str) -> None:
    if fmt == "hf":
      export_hf(models, flat, tok, folder, card)
    else:
      export_sentence_transformers(models[0], flat, tok, folder, card,
                                   seq_len=int(config.train.seq_len), size=size,
                                   pooling=pooling or "mean")

  write_out(target, write, dict(written_by="amos-export", workdir=os.path.abspath(workdir) if paths.is_local(workdir) else workdir,
                                step=step, format=fmt))
  return [os.path.join(target, m.subdir) if m.subdir else target for m in models]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="amos-export", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--format", default="hf", choices=("hf", "sentence-transformers"))
  p.add_argument("--size", default=None, help="L,D: layer and dimension (2D Matryoshka); "
                 "sentence-transformers only")
  p.add_argument("--pooling", default=None, choices=("mean", "cls"),
                 help="sentence-transformers only (default mean)")
  a = p.parse_args(argv)
  # The export is host work: no TPU runtime probe (and its banner) without chips.
  from amos_jax.train.distributed import skip_absent_tpu
  skip_absent_tpu()
  size = None
  if a.size:
    try:
      size = tuple(int(x) for x in a.size.split(","))
      assert len(size) == 2
    except (ValueError, AssertionError):
      raise ExportError(f"--size {a.size!r}: give L,D, e.g. --size 6,128") from None
  for path in export(a.workdir, a.out, a.format, a.step, size, a.pooling):
    print(path)


if __name__ == "__main__":
  main()
