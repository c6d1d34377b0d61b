"""amos-train --config configs/electra.py:small --workdir runs/electra_small

ELECTRA (Clark et al., ICLR 2020): a generator of 1/4 (small, large) or 1/3 (base)
the discriminator's width fills masked positions with Gumbel-max samples; the
discriminator detects replaced tokens. Loss = MLM + 50 * RTD. Argument: tiny | small
| base | large.
"""
from amos_jax.config import base_config, set_size


def get_config(arg: str = "small"):
  size = arg or "small"
  c = base_config()
  set_size(c, size, "configs/electra.py")
  c.objective.update(name="electra", mask_scheme="electra", rtd_weight=50.0,
                     rtd_head_layers=2, sampling_temperature=1.0,
                     mask_rate=0.25 if size == "large" else 0.15)
  c.objective.generator.update(width_fraction=1 / 3 if size == "base" else 0.25,
                               num_layers=0, dropout=True)
  c.train.update(
      learning_rate={"small": 5e-4}.get(size, 2e-4),
      batch_size={"large": 2048, "base": 256}.get(size, 128),
      seq_len=512 if size in ("base", "large") else 128,
      steps={"small": 1_000_000, "base": 766_000, "large": 400_000}.get(size, 10_000),
      warmup_steps=10_000)
  return c
