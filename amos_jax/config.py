"""The config tree shared by every run, and its validation.

Configs are code: `configs/*.py` start from `base_config()` and edit it. The tree is
small and nested by concern: model, objective, data, train, mesh, sharding,
checkpoint, eval. `validate(config, num_devices)` turns a bad value into one clear
line naming the field, before anything is compiled.
"""
from __future__ import annotations

import ml_collections

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
      initializer_range=0.02, dtype="float32", attention_impl=ml_collections.FieldReference(
          None, field_type=str), relative_attention_buckets=0,
      relative_attention_max_distance=128, remat=False, **MODEL_SIZES["small"]))

  c.objective = ml_collections.ConfigDict(dict(
      name="electra", mask_rate=0.15, mask_scheme="electra", max_predictions=0,
      whole_word=False, mlm_weight=1.0, rtd_weight=50.0, rtd_head_layers=2,
      sampling_temperature=1.0, mixture=False, hard_sample=True,
      adversarial=True, head_loss_reduction="sum",
      generator=ml_collections.ConfigDict(dict(
          width_fraction=0.25, num_layers=0, tap_layers=(), dropout=True))))

  c.data = ml_collections.ConfigDict(dict(
      corpus="demo",          # 'demo' (embedded) or a text file / glob, one doc per line
      prepared="",            # an amos-prepare output directory (overrides corpus)
      tokenizer="",           # '' trains a sentencepiece model on the corpus
      tokenizer_type="unigram",
      eval_fraction=0.02,     # held-out documents for the eval loss
      mask_id=4, special_ids=(0, 1, 2, 3, 4)))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=128, seq_len=128, learning_rate=5e-4, warmup_steps=100,
      schedule="linear", end_learning_rate_fraction=0.0, weight_decay=0.01,
      clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-6, seed=0, log_every=10, eval_every=200,
      eval_batches=4, grad_accum_steps=1, max_nonfinite_steps=10))

  # topology: a TPU pod ("v5p:4x4x4") and fake_devices: N fake CPU devices, both
  # only for `amos-train --compile_only`.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, topology="",
                                          fake_devices=0))
  c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, keep_period=0,
                                                async_save=True))
  return c


def set_size(c: ml_collections.ConfigDict, size: str) -> None:
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {sorted(MODEL_SIZES)}")
  c.model.update(MODEL_SIZES[size])


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line naming the field."""


def resolve_mesh_shape(mesh, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one -1 filled from the device count."""
  shape = [int(mesh.data), int(mesh.fsdp), int(mesh.tensor)]
  if shape.count(-1) > 1:
    raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  known = 1
  for s in shape:
    if s != -1:
      if s < 1:
        raise ConfigError(f"mesh: sizes must be positive or -1, got {tuple(shape)}")
      known *= s
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(
          f"mesh: {num_devices} devices do not divide into mesh.fsdp x mesh.tensor = "
          f"{known}; set mesh sizes whose product divides {num_devices}")
    shape[shape.index(-1)] = num_devices // known
  if shape[0] * shape[1] * shape[2] != num_devices:
    raise ConfigError(
        f"mesh: mesh.data x mesh.fsdp x mesh.tensor = {shape[0]}x{shape[1]}x{shape[2]} "
        f"= {shape[0] * shape[1] * shape[2]} does not match the {num_devices} devices; "
        "set one of them to -1 to fill")
  return tuple(shape)


def validate(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks the config against itself and the devices; returns the mesh shape."""
  from amos_jax.objectives import OBJECTIVES
  m, o, t = c.model, c.objective, c.train
  if o.name not in OBJECTIVES:
    raise ConfigError(f"objective.name={o.name!r} is unknown; choose one of "
                      f"{', '.join(OBJECTIVES)}")
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} does not divide "
                      f"model.hidden_size={m.hidden_size}; pick a divisor")
  if t.seq_len > m.max_position_embeddings:
    raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                      f"{m.max_position_embeddings}")
  if not 0.0 < o.mask_rate < 1.0:
    raise ConfigError(f"objective.mask_rate={o.mask_rate} must be in (0, 1)")
  from amos_jax.objectives.masking import SCHEMES
  if o.mask_scheme not in SCHEMES:
    raise ConfigError(f"objective.mask_scheme={o.mask_scheme!r} is unknown; choose one "
                      f"of {', '.join(SCHEMES)}")
  if m.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"model.dtype={m.dtype!r}: use float32, bfloat16 or float16")
  if o.name in ("electra", "amos"):
    g = o.generator
    hidden = int(round(m.hidden_size * g.width_fraction))
    heads = max(1, int(round(m.num_heads * g.width_fraction)))
    if hidden < 1 or hidden % heads:
      raise ConfigError(
          f"objective.generator.width_fraction={g.width_fraction} gives a generator "
          f"width {hidden} that its {heads} heads do not divide")
    if o.rtd_head_layers not in (1, 2):
      raise ConfigError(f"objective.rtd_head_layers={o.rtd_head_layers} must be 1 or 2")
  if o.name == "amos":
    taps = tuple(o.generator.tap_layers)
    if not taps or min(taps) < 1:
      raise ConfigError("objective.generator.tap_layers must list layers >= 1, e.g. "
                        "(4, 6, 8)")
    if o.head_loss_reduction not in ("sum", "mean"):
      raise ConfigError(f"objective.head_loss_reduction={o.head_loss_reduction!r}: use "
                        "'sum' or 'mean'")
  shape = resolve_mesh_shape(c.mesh, num_devices)
  data_shards = shape[0] * shape[1]
  micro = t.batch_size // max(1, t.grad_accum_steps)
  if t.batch_size % max(1, t.grad_accum_steps):
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  if micro % data_shards:
    raise ConfigError(
        f"train.batch_size={t.batch_size} (per micro-batch {micro}) does not divide over "
        f"the {data_shards} data shards (mesh.data x mesh.fsdp); use a multiple of "
        f"{data_shards}")
  if t.steps < 1:
    raise ConfigError(f"train.steps={t.steps} must be >= 1")
  return shape


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its get_config(arg), as `--config` loads it."""
  import importlib.util
  import os
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  name = "amos_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
