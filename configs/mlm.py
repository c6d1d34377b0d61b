"""amos-train --config configs/mlm.py:base --workdir runs/mlm_base

BERT masked-language-model pre-training (the MLM baseline): 15% of tokens, 80% [MASK]
/ 10% random / 10% kept. Argument: tiny | small | base | large.
"""
from amos_jax.config import base_config, set_size


def get_config(arg: str = "base"):
  size = arg or "base"
  c = base_config()
  set_size(c, size, "configs/mlm.py")
  if size in ("base", "large"):
    c.model.embedding_size = c.model.hidden_size
  c.objective.update(name="mlm", mask_scheme="bert", mask_rate=0.15)
  c.train.update(learning_rate=1e-4 if size in ("base", "large") else 5e-4,
                 batch_size=256, seq_len=512 if size in ("base", "large") else 128,
                 steps=1_000_000, warmup_steps=10_000)
  return c
