"""amos-train --config configs/demo.py --workdir runs/demo

A tiny AMOS model on the embedded corpus (a Wikipedia sample and news articles that
the gensim wheel ships): 4-layer, 128-wide discriminator; a full-width 4-layer
generator tapped at layers 2, 3, 4. A few minutes on a 2-core CPU.
"""
import os

from amos_jax.config import load_config_file


def get_config(arg: str = ""):
  del arg
  c = load_config_file(os.path.join(os.path.dirname(__file__), "amos.py:tiny"))
  c.objective.generator.tap_layers = (2, 3, 4)
  c.model.vocab_size = 4096
  c.model.max_position_embeddings = 128
  c.train.update(steps=300, batch_size=32, seq_len=128, learning_rate=1e-3,
                 warmup_steps=30, log_every=10, eval_every=100, eval_batches=4)
  c.checkpoint.every = 100
  return c
