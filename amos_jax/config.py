"""The config tree shared by every run, and its validation.

Configs are code: `configs/*.py` start from `base_config()` and edit it. The tree is
small and nested by concern: model, objective, data, train, mesh, sharding,
checkpoint, eval. `validate(config, num_devices)` turns a bad value into one clear
line naming the field, before anything is compiled.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from amos_jax.errors import AmosError, ConfigError, one_line

# The mesh axes, named here once: `config.mesh` has a size per axis, the rules table
# maps logical names onto them, and `train/sharding.py` builds the Mesh with them.
MESH_AXES = ("data", "fsdp", "tensor")

# Choices of model.remat (True / False read as full / none), model.attention_impl,
# train.rng_impl, model.dropout_impl, model.layer_norm_impl and model.gelu_impl.
REMAT_CHOICES = ("auto", "none", "dots_saveable", "full", "true", "false")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "gemm", "fused")
RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")
DROPOUT_IMPLS = ("auto", "xla", "native")
LAYER_NORM_IMPLS = ("auto", "xla", "native")
GELU_IMPLS = ("auto", "xla", "native")
GRAD_ALLREDUCE = ("auto", "per_layer", "once")

# Paper sizes. ELECTRA: small 256x12 (E=128), base 768x12, large 1024x24.
MODEL_SIZES = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512,
                 embedding_size=128),
    "small": dict(hidden_size=256, num_layers=12, num_heads=4, intermediate_size=1024,
                  embedding_size=128),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                 embedding_size=768),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                  embedding_size=1024),
}

# Logical axis -> mesh axes. Parameters: embed over fsdp (ZeRO-3 style), the wide
# axes over tensor. Activations: batch over (data, fsdp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_in", None),
    ("embed_out", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("seq", None),
    ("norm", None),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""              # hf:PATH starts from a Hugging Face checkpoint
  c.init_from_allow_pickle = False  # allow pytorch_model.bin (torch.load weights_only)

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
      hidden_dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-12,
      initializer_range=0.02, dtype="float32",
      attention_impl="auto",  # auto | xla | cudnn (NVIDIA GPUs) | gemm | fused (CPU)
      dropout_impl="auto",    # auto | xla | native (CPU custom call): the same masks
      layer_norm_impl="auto",  # auto | xla | native (CPU custom calls)
      gelu_impl="auto",       # auto | xla | native (CPU custom call: the backward pass)
      relative_attention_buckets=0, relative_attention_max_distance=128,
      scan_layers=True,       # lax.scan over layers: compile time flat in depth
      remat="auto",           # auto | none | dots_saveable | full (what backward
                              # recomputes; auto: dots_saveable under scan, else none)
      **MODEL_SIZES["small"]))

  c.objective = ml_collections.ConfigDict(dict(
      name="electra", mask_rate=0.15, mask_scheme="electra", max_predictions=0,
      whole_word=False, mlm_weight=1.0, rtd_weight=50.0, rtd_head_layers=2,
      embedding_sharing="all",  # all (ELECTRA) | tokens (AMOS) | gdes (DeBERTa-v3)
      sampling_temperature=1.0, mixture=False, hard_sample=True,
      sampler="inverse_cdf",  # ELECTRA's vocabulary sample: inverse_cdf | gumbel (same law)
      adversarial=True, head_loss_reduction="sum",
      generator=ml_collections.ConfigDict(dict(
          width_fraction=0.25, num_layers=0, tap_layers=(), dropout=True))))

  c.data = ml_collections.ConfigDict(dict(
      corpus="demo",          # 'demo' (embedded) or a text file / glob, one doc per line
      prepared="",            # an amos-prepare output directory (overrides corpus)
      tokenizer="",           # '' trains a sentencepiece model on the corpus
      tokenizer_type="unigram",
      eval_fraction=0.02))    # held-out documents for the eval loss

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=128, seq_len=128, learning_rate=5e-4, warmup_steps=100,
      warmup_fraction=0.0,    # > 0: warm up over this fraction of train.steps instead
      schedule="linear", end_learning_rate_fraction=0.0, weight_decay=0.01,
      clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-6, seed=0, log_every=10, eval_every=200,
      eval_batches=4, grad_accum_steps=1, max_nonfinite_steps=10,
      rng_impl="threefry"))   # threefry | rbg | unsafe_rbg: the bit generator of
                              # masks, samples and dropout
  # amos-train keeps XLA's compiled programs here and loads them on the next run of
  # the same program ('' = off; amos_jax/train/compile_cache.py).
  c.train.compilation_cache_dir = "~/.cache/amos_jax/xla"

  # topology: a TPU pod ("v5p:4x4x4") and fake_devices: N fake CPU devices, both
  # only for `amos-train --compile_only`.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, topology="",
                                          fake_devices=0))
  # grad_allreduce: how data-parallel gradients cross devices (train/step.py):
  # per_layer (where the partitioner puts it, inside the layer scan), once (one flat
  # all-reduce per step; needs replicated parameters), auto (once on multi-process
  # CPU runs, whose collectives pay a millisecond per array; else per_layer).
  c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES, grad_allreduce="auto"))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, keep_period=0,
                                                async_save=True))
  return c


def set_size(c: ml_collections.ConfigDict, size: str, config_file: str = "") -> None:
  if size not in MODEL_SIZES:
    where = f"{config_file}:{size}" if config_file else f"size {size!r}"
    raise ConfigError(f"{where} is not a model size; choose one of "
                      f"{', '.join(MODEL_SIZES)}")
  c.model.update(MODEL_SIZES[size])


def resolve_mesh_shape(mesh, num_devices: int) -> tuple[int, ...]:
  """The mesh shape over MESH_AXES with one -1 filled from the device count."""
  names = " x ".join(f"mesh.{a}" for a in MESH_AXES)
  shape = [int(mesh[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh: at most one of {', '.join(f'mesh.{a}' for a in MESH_AXES)} "
                      "may be -1")
  known = 1
  for s in shape:
    if s != -1:
      if s < 1:
        raise ConfigError(f"mesh: sizes must be positive or -1, got {tuple(shape)}")
      known *= s
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(
          f"mesh: {num_devices} devices do not divide into the fixed mesh sizes "
          f"(product {known}); set mesh sizes whose product divides {num_devices}")
    shape[shape.index(-1)] = num_devices // known
  total = int(np.prod(shape))
  if total != num_devices:
    raise ConfigError(
        f"mesh: {names} = {'x'.join(map(str, shape))} = {total} does not match the "
        f"{num_devices} devices; set one of them to -1 to fill")
  return tuple(shape)


def warmup_steps(t) -> int:
  """`train.warmup_steps`, or `train.warmup_fraction` of `train.steps` when set."""
  if t.get("warmup_fraction"):
    return int(round(float(t.warmup_fraction) * t.steps))
  return int(t.warmup_steps)


def validate(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Checks the config against itself and the devices; returns the mesh shape.

  Generic sections here; the objective checks its own section
  (`Objective.validate_config`). Every failure is one ConfigError line naming the key.
  """
  from amos_jax.objectives import get_objective_class
  m, t = c.model, c.train
  objective = get_objective_class(c.objective.name)
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} does not divide "
                      f"model.hidden_size={m.hidden_size}; pick a divisor")
  for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings"):
    if int(m[key]) < 1:
      raise ConfigError(f"model.{key}={m[key]} must be >= 1")
  if t.seq_len > m.max_position_embeddings:
    raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                      f"{m.max_position_embeddings}")
  if t.seq_len < 4:
    raise ConfigError(f"train.seq_len={t.seq_len} is too short; use at least 4")
  if m.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"model.dtype={m.dtype!r}: use float32, bfloat16 or float16")
  if str(m.get("remat", "auto")).lower() not in REMAT_CHOICES:
    raise ConfigError(f"model.remat={m.remat!r}: use auto, none, dots_saveable or full")
  for key, choices in (("attention_impl", ATTENTION_IMPLS), ("dropout_impl", DROPOUT_IMPLS),
                       ("layer_norm_impl", LAYER_NORM_IMPLS), ("gelu_impl", GELU_IMPLS)):
    if (m.get(key) or "auto") not in choices:
      raise ConfigError(f"model.{key}={m.get(key)!r}: use one of {', '.join(choices)}")
  if t.get("rng_impl", "threefry") not in RNG_IMPLS:
    raise ConfigError(f"train.rng_impl={t.rng_impl!r}: use threefry, rbg or unsafe_rbg")
  if c.sharding.get("grad_allreduce", "auto") not in GRAD_ALLREDUCE:
    raise ConfigError(f"sharding.grad_allreduce={c.sharding.grad_allreduce!r}: use auto, "
                      "per_layer or once")
  if t.steps < 1:
    raise ConfigError(f"train.steps={t.steps} must be >= 1")
  if t.batch_size < 1:
    raise ConfigError(f"train.batch_size={t.batch_size} must be >= 1 (the global batch, "
                      "summed over all devices)")
  if t.grad_accum_steps < 1:
    raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1")
  if t.learning_rate <= 0:
    raise ConfigError(f"train.learning_rate={t.learning_rate} must be > 0")
  for key in ("b1", "b2"):
    if not 0 <= t[key] < 1:
      raise ConfigError(f"train.{key}={t[key]} must be in [0, 1) (Adam's moment decay; "
                        "BERT and ELECTRA use b1=0.9, b2=0.999)")
  if t.eps <= 0:
    raise ConfigError(f"train.eps={t.eps} must be > 0 (Adam's denominator term)")
  if t.schedule not in ("linear", "cosine"):
    raise ConfigError(f"train.schedule={t.schedule!r}: use 'linear' or 'cosine'")
  if not 0.0 <= float(t.get("warmup_fraction", 0.0)) <= 1.0:
    raise ConfigError(f"train.warmup_fraction={t.warmup_fraction} must be in [0, 1]")
  if t.log_every < 1:
    raise ConfigError(f"train.log_every={t.log_every} must be >= 1")
  if not 0.0 <= c.data.eval_fraction < 1.0:
    raise ConfigError(f"data.eval_fraction={c.data.eval_fraction} must be in [0, 1)")
  if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
    raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")
  objective.validate_config(c)
  shape = resolve_mesh_shape(c.mesh, num_devices)
  data_shards = 1
  for axis in batch_mesh_axes(c.sharding.rules):
    data_shards *= shape[MESH_AXES.index(axis)]
  micro = t.batch_size // t.grad_accum_steps
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  if micro % data_shards:
    raise ConfigError(
        f"train.batch_size={t.batch_size} (per micro-batch {micro}) does not divide over "
        f"the {data_shards} data shards (the mesh axes of the 'batch' rule); use a "
        f"multiple of {data_shards}")
  return shape


def batch_mesh_axes(rules) -> tuple[str, ...]:
  """The mesh axes the rules table splits the batch over."""
  for name, target in rules:
    if name == "batch":
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  return ()


# ---------------------------------------------------------- loading and overrides
def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its get_config(arg), mutable.

  A missing file, a syntax error, a file without `get_config` or a bad argument is
  one ConfigError line.
  """
  import importlib.util
  import os
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config: no such file {path!r}; give configs/NAME.py[:ARG]")
  name = "amos_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config {path}:{e.lineno}: syntax error ({e.msg}); fix the "
                      "config file") from None
  except AmosError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure of user code while loading
    raise ConfigError(f"--config {path}: loading failed ({type(e).__name__}: "
                      f"{one_line(e)})") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--config {path} defines no get_config(arg); a config file "
                      "returns its ConfigDict from get_config")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except AmosError:
    raise
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"--config {spec}: get_config failed ({type(e).__name__}: "
                      f"{one_line(e)})") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config {path}: get_config returned {type(config).__name__}, "
                      "not an ml_collections.ConfigDict")
  return config


def flat_keys(c, prefix: str = "") -> dict:
  """{'a.b.c': value} over a (nested) ConfigDict or dict."""
  out = {}
  for k, v in c.items():
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flat_keys(v, key + "."))
    else:
      out[key] = v
  return out


def _parse_value(text: str, current):
  """A command-line string as the type of the key's current value."""
  import ast
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError("expects true or false")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(text) if text.strip() else ()
    if isinstance(value, (int, float, str)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ValueError("expects a tuple like (4,6,8)")
    return tuple(value)
  if current is None or isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(c: ml_collections.ConfigDict, overrides) -> None:
  """Applies `--config.KEY=VALUE` pairs; an unknown key suggests the closest one."""
  import difflib
  known = flat_keys(c)
  for key, text in overrides:
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
      hint = f"; did you mean --config.{close[0]}?" if close else ""
      raise ConfigError(f"--config.{key}: no such config key{hint}")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    current = node[leaf]
    try:
      node[leaf] = _parse_value(text, current)
    except (ValueError, TypeError, SyntaxError) as e:
      kind = type(current).__name__ if current is not None else "str"
      raise ConfigError(f"--config.{key}={text!r}: not a valid {kind} ({one_line(e)})"
                        ) from None


def freeze(c: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The immutable config a run uses: nothing downstream writes back into it."""
  if isinstance(c, ml_collections.FrozenConfigDict):
    return c
  return ml_collections.FrozenConfigDict(c)
