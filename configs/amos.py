"""amos-train --config configs/amos.py:base --workdir runs/amos_base

AMOS (Meng et al., ICLR 2022): ELECTRA-style replaced-token detection where one
full-width generator, tapped at layers 4/6/8, mixes its MLM heads per token through
an adversarially trained mixture (straight-through Gumbel-softmax at temperature
0.3, reversed gradient). Argument: tiny | small | base | large.
"""
from amos_jax.config import base_config, set_size


def get_config(arg: str = "base"):
  size = arg or "base"
  c = base_config()
  set_size(c, size, "configs/amos.py")
  c.objective.update(
      name="amos", mask_scheme="electra", rtd_weight=50.0, rtd_head_layers=1,
      sampling_temperature=0.3, mixture=True, head_loss_reduction="sum",
      embedding_sharing="tokens",
      mask_rate=0.25 if size == "large" else 0.15)
  # Full width, as deep as the deepest tap; the reference runs it without dropout.
  c.objective.generator.update(width_fraction=1.0, num_layers=0, dropout=False,
                               tap_layers=(8, 12, 16) if size == "large" else (4, 6, 8))
  c.train.update(
      learning_rate={"small": 5e-4}.get(size, 2e-4),
      batch_size={"large": 2048, "base": 256}.get(size, 128),
      seq_len=512 if size in ("base", "large") else 128,
      steps=125_000 if size == "base" else 1_000_000, warmup_steps=10_000)
  return c
