"""amos-export --workdir DIR --out OUT [--step N] --format hf|sentence-transformers

Writes a run's checkpoint as folders that `transformers` (and `sentence-transformers`)
load with `from_pretrained` and no custom code:
  mlm      OUT: BertForMaskedLM (ElectraForMaskedLM when embedding_size != hidden_size,
           which BERT cannot hold)
  electra  OUT: ElectraForPreTraining (the discriminator); OUT/generator: ElectraForMaskedLM
  amos     OUT: ElectraForPreTraining; OUT/generator_layer<l>: one ElectraForMaskedLM per
           tapped depth l (the shared MLM head read after l blocks: a complete MLM)
  --format sentence-transformers: the encoder (discriminator) + pooling + normalize;
           `--size L,D` keeps the first L layers and the first D dimensions.
Each folder gets the tokenizer (tokenizer.json) and a model-card README.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from amos_jax.hf import names
from amos_jax.hf.load import RTD_HEAD_FILE
from amos_jax.hf.tokenizer_export import save_hf_tokenizer


class ExportError(SystemExit):
  def __init__(self, message: str):
    super().__init__(f"error: amos-export: {message}")


# ------------------------------------------------------------------ reading a run
def load_run(workdir: str, step: int | None = None):
  """(config, {our path: float32 array}, step) of a run's checkpoint.

  Reads only the `state` item's params, whatever else the checkpoint holds.
  """
  import ml_collections
  import orbax.checkpoint as ocp
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise ExportError(f"{cfg_path} not found; --workdir must be an amos-train run directory")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(ckpt_dir, "*"))
                 if os.path.basename(p).isdigit())
  if not steps:
    raise ExportError(f"no checkpoint in {ckpt_dir}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ExportError(f"--step {step} not found; available: {steps}")
  tree = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), "state"))
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
  own = os.path.join(workdir, "tokenizer")
  spec = own if os.path.isdir(own) else config.data.get("tokenizer", "")
  if not spec:
    raise ExportError(f"no tokenizer: {own} is missing and data.tokenizer is empty")
  return load_tokenizer(spec)


# ------------------------------------------------------------- transformers files
def hf_config(arch: str, m, *, num_layers: int, hidden: int, heads: int,
              intermediate: int, pad_id: int) -> dict:
  """transformers config.json for one of our encoders."""
  bert = arch.startswith("Bert")
  cfg = dict(
      architectures=[arch], model_type="bert" if bert else "electra",
      vocab_size=int(m.vocab_size), hidden_size=hidden, num_hidden_layers=num_layers,
      num_attention_heads=heads, intermediate_size=intermediate, hidden_act="gelu",
      hidden_dropout_prob=float(m.hidden_dropout),
      attention_probs_dropout_prob=float(m.attention_dropout),
      max_position_embeddings=int(m.max_position_embeddings),
      type_vocab_size=int(m.type_vocab_size), initializer_range=float(m.initializer_range),
      layer_norm_eps=float(m.layer_norm_eps), pad_token_id=int(pad_id),
      position_embedding_type="absolute", tie_word_embeddings=True)
  if not bert:
    cfg["embedding_size"] = int(m.embedding_size or m.hidden_size)
  return cfg


def write_model(out: str, tensors: dict, config: dict) -> None:
  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def rooted(flat: dict, root: tuple, new: tuple = ("encoder",)) -> dict:
  return {new + p[len(root):]: v for p, v in flat.items() if p[:len(root)] == root}


def encoder_view(flat: dict, which: str, num_layers: int | None = None) -> dict:
  """One encoder's params under ('encoder', ...), with the shared embedding block
  (stored once, under the discriminator) and only the first num_layers blocks."""
  enc = rooted(flat, (which,))
  if which == "generator":
    enc.update(rooted(flat, ("discriminator", "embeddings"), ("encoder", "embeddings")))
  if num_layers is not None:
    enc = {p: v for p, v in enc.items()
           if not (p[1:3] == ("encoder", "layer") and p[3] >= num_layers)}
  return enc


def one_layer_rtd_as_two(w: np.ndarray, b: np.ndarray) -> dict:
  """AMOS's Dense(H->1) as transformers' dense -> GELU -> dense_prediction, exactly.

  gelu(z) - gelu(-z) = z Phi(z) + z (1 - Phi(z)) = z, so with rows (w, -w) in the
  first dense and (1, -1) in the second, the two-layer head computes w.x + b.
  w: (H, 1) kernel, b: (1,). Returns {our head path: array} for the two-layer head.
  """
  h = w.shape[0]
  if h < 2:
    raise ExportError("a width-1 discriminator cannot hold the one-layer RTD head")
  dense = np.zeros((h, h), np.float32)
  dense[:, 0], dense[:, 1] = w[:, 0], -w[:, 0]
  pred = np.zeros((h, 1), np.float32)
  pred[0, 0], pred[1, 0] = 1.0, -1.0
  return {("head", "dense", "kernel"): dense, ("head", "dense", "bias"): np.zeros(h, np.float32),
          ("head", "dense_prediction", "kernel"): pred,
          ("head", "dense_prediction", "bias"): np.asarray(b, np.float32)}


def _write_hf(out, arch, enc, head, cfg, tok, card):
  table = names.layout(arch, ("encoder",), ("head",) if head else None)
  write_model(out, names.to_hf({**enc, **(head or {})}, table), cfg)
  save_hf_tokenizer(tok, out, cfg["max_position_embeddings"])
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(card)


def export_hf(config, flat, tok, out: str, card) -> list[str]:
  """Writes the transformers folders for the run's objective; returns their paths."""
  m, name = config.model, config.objective.name
  e = int(m.embedding_size or m.hidden_size)
  dims = dict(num_layers=int(m.num_layers), hidden=int(m.hidden_size),
              heads=int(m.num_heads), intermediate=int(m.intermediate_size),
              pad_id=tok.pad_id)
  written = []
  if name in ("mlm", "smae"):
    arch = "BertForMaskedLM" if e == m.hidden_size else "ElectraForMaskedLM"
    _write_hf(out, arch, encoder_view(flat, "encoder"), rooted(flat, ("mlm_head",), ("head",)),
              hf_config(arch, m, **dims), tok, card(arch, "the MLM encoder and head"))
    return [out]
  if name not in ("electra", "amos"):
    raise ExportError(f"objective {name!r} has no transformers head; use --format "
                      "sentence-transformers")
  arch = "ElectraForPreTraining"
  head = rooted(flat, ("discriminator_head",), ("head",))
  extra = None
  if ("head", "dense", "kernel") not in head:
    extra = head
    head = one_layer_rtd_as_two(head[("head", "dense_prediction", "kernel")],
                                head[("head", "dense_prediction", "bias")])
  _write_hf(out, arch, encoder_view(flat, "discriminator"), head, hf_config(arch, m, **dims),
            tok, card(arch, "the discriminator and its replaced-token-detection head"))
  if extra is not None:
    from safetensors.numpy import save_file
    save_file({"dense_prediction.weight": np.ascontiguousarray(
                   extra[("head", "dense_prediction", "kernel")].T),
               "dense_prediction.bias": extra[("head", "dense_prediction", "bias")]},
              os.path.join(out, RTD_HEAD_FILE), metadata={"format": "pt"})
  written.append(out)

  from amos_jax.objectives.electra import generator_config
  g = generator_config(config)
  gdims = dict(dims, hidden=g.hidden_size, heads=g.num_heads,
               intermediate=g.intermediate_size)
  gm = dict(m.to_dict() if hasattr(m, "to_dict") else dict(m), embedding_size=e)
  import ml_collections
  gm = ml_collections.ConfigDict(gm)
  depths = ([(os.path.join(out, "generator"), g.num_layers)] if name == "electra" else
            [(os.path.join(out, f"generator_layer{l}"), int(l))
             for l in sorted(config.objective.generator.tap_layers)])
  gen_head = rooted(flat, ("generator_head",), ("head",))
  for path, depth in depths:
    _write_hf(path, "ElectraForMaskedLM", encoder_view(flat, "generator", depth), gen_head,
              hf_config("ElectraForMaskedLM", gm, **dict(gdims, num_layers=depth)), tok,
              card("ElectraForMaskedLM", f"the generator read after {depth} blocks"))
    written.append(path)
  return written


# ----------------------------------------------------------- sentence-transformers
def export_sentence_transformers(config, flat, tok, out: str, card, *,
                                 size: tuple[int, int] | None = None,
                                 pooling: str = "mean", normalize: bool = True) -> str:
  """encoder (+ first L layers) -> Pooling -> [Dense keeping the first D dims] ->
  [Normalize]; cosine similarity."""
  m = config.model
  which = "encoder" if config.objective.name in ("mlm", "smae") or (
      "encoder", "embeddings", "word_embeddings", "embedding") in flat else "discriminator"
  h = int(m.hidden_size)
  layers, dim = (int(m.num_layers), h) if size is None else size
  if not (1 <= layers <= m.num_layers and 1 <= dim <= h):
    raise ExportError(f"--size {layers},{dim} is outside the model ({m.num_layers} layers, "
                      f"width {h})")
  e = int(m.embedding_size or m.hidden_size)
  arch = "BertModel" if e == h else "ElectraModel"
  cfg = hf_config(arch, m, num_layers=layers, hidden=h, heads=int(m.num_heads),
                  intermediate=int(m.intermediate_size), pad_id=tok.pad_id)
  _write_hf(out, arch, encoder_view(flat, which, layers), None, cfg, tok,
            card(arch, f"a sentence embedding model: layer {layers}, {dim} dimensions, "
                 f"{pooling} pooling"))
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
    json.dump({"max_seq_length": int(config.train.seq_len), "do_lower_case": False}, f)
  with open(os.path.join(out, "config_sentence_transformers.json"), "w") as f:
    json.dump({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None},
              f, indent=2)
  return out


# ------------------------------------------------------------------ model card
def model_card(config, workdir: str, step: int):
  """A function (architecture, what) -> README.md text for one exported folder."""
  m, o = config.model, config.objective
  last = {}
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(metrics):
    with open(metrics) as f:
      for line in f:
        if line.strip():
          last.update(json.loads(line))
  shown = {k: round(v, 4) for k, v in last.items()
           if isinstance(v, float) and ("loss" in k or "accuracy" in k)}

  def card(arch: str, what: str) -> str:
    lines = [
        f"# {o.name} encoder ({arch})", "",
        f"Exported by `amos-export`: {what}.", "",
        f"- objective: {o.name}" + (f" (taps {tuple(o.generator.tap_layers)})"
                                    if o.name == "amos" else ""),
        f"- sizes: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
        f"intermediate {m.intermediate_size}, embedding {m.embedding_size or m.hidden_size}, "
        f"vocabulary {m.vocab_size}",
        f"- training steps: {step} of {config.train.steps} (batch {config.train.batch_size}"
        f" x {config.train.seq_len} tokens)",
        f"- data: {config.data.corpus}" + (f"; initialized from {config.init_from}"
                                           if config.get("init_from") else ""),
        f"- metrics at the last logged step: {json.dumps(shown) if shown else 'none logged'}",
    ]
    if o.name == "amos" and arch == "ElectraForPreTraining":
      lines += ["", "AMOS's replaced-token-detection head is one Dense(H->1). transformers' "
                "head is dense -> GELU -> dense_prediction; it holds the one-layer head "
                "exactly (rows (w, -w), then (1, -1): gelu(z) - gelu(-z) = z). The "
                f"original weights are also in `{RTD_HEAD_FILE}`."]
    return "\n".join(lines) + "\n"

  return card


# ------------------------------------------------------------------------- CLI
def export(workdir: str, out: str, fmt: str = "hf", step: int | None = None,
           size: tuple[int, int] | None = None, pooling: str = "mean") -> list[str]:
  config, flat, step = load_run(workdir, step)
  if config.model.get("relative_attention_buckets", 0):
    raise ExportError(
        "this model uses a relative position bias (model.relative_attention_buckets="
        f"{config.model.relative_attention_buckets}), which stock transformers BERT/ELECTRA "
        "cannot express; a folder that loads would compute something else")
  tok = load_run_tokenizer(workdir, config)
  card = model_card(config, workdir, step)
  if fmt == "hf":
    return export_hf(config, flat, tok, out, card)
  if fmt == "sentence-transformers":
    return [export_sentence_transformers(config, flat, tok, out, card, size=size,
                                         pooling=pooling)]
  raise ExportError(f"--format {fmt!r}: use hf or sentence-transformers")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="amos-export", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--format", default="hf", choices=("hf", "sentence-transformers"))
  p.add_argument("--size", default=None, help="L,D: layer and dimension (2D Matryoshka)")
  p.add_argument("--pooling", default="mean", choices=("mean", "cls"))
  a = p.parse_args(argv)
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
