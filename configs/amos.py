"""amos-train --config configs/amos.py:base --workdir runs/amos_base

AMOS (Meng et al., ICLR 2022): ELECTRA-style replaced-token detection where one
full-width generator, tapped at layers 4/6/8, mixes its MLM heads per token through
an adversarially trained mixture (straight-through Gumbel-softmax at temperature
0.3, reversed gradient). Argument: tiny | small | base | large.

`base` is the paper's base pre-training setting, the one it shares with COCO-LM
(Meng et al., NeurIPS 2021): BERT-base compute on 512-token sequences.
  batch 2048, seq_len 512, 125k steps  COCO-LM section 5 ("125K batches with 2048
                                       batch size" on 512-token sequences); the
                                       AMOS paper reuses that setting
  peak learning rate 5e-4              the pre-training hyperparameter table in the
                                       COCO-LM / AMOS appendix, base column
  10k warm-up steps, then linear       the same table; microsoft/AMOS and COCO-LM
  decay to 0                           train with fairseq, whose polynomial_decay
                                       (power 1, end 0) is this schedule
  Adam betas (0.9, 0.98), eps 1e-6,    the same table; the same values in the first
  clip norm 2.0, weight decay 0.01,    author's released fairseq pre-training script
  dropout 0.1                          (yumeng5/MAE-LM run_pretrain.sh)
  generator: taps 4/6/8, full width,   microsoft/AMOS fairseq/fairseq/models/amos/
  no dropout, own position embeddings  model.py (base_architecture:
  and LayerNorm ('tokens'), RTD x50,   generator_mlm_layers [4,6,8],
  Gumbel temperature 0.3, gradient     generator_sample_mode zero-dropout,
  multiplier -1                        binary_loss_weight 50,
                                       gumbel_softmax_temperature 0.3, disc_grad_mul -1)
Left as the defaults, with no source that says otherwise: mask rate 0.15 and the
ELECTRA 85/15 replacement (the reference masking code is unpublished). Not set:
the reference model's T5-style relative position bias (rel_pos_bins 32,
max_rel_pos 128 in model.py; `--config.model.relative_attention_buckets=32` turns
it on, at the cost of Hugging Face export), and its 32,768-token uncased BPE
vocabulary (the vocabulary comes from `data.tokenizer`).
The other sizes keep ELECTRA's schedules (small: 5e-4, batch 128, 1M steps; large:
2e-4, batch 2048, 1M steps) with AdamW's defaults here (beta2 0.999, clip 1.0).
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
      batch_size={"large": 2048}.get(size, 128),
      seq_len=512 if size in ("base", "large") else 128,
      steps=1_000_000, warmup_steps=10_000)
  if size == "base":
    c.train.update(batch_size=2048, seq_len=512, steps=125_000, learning_rate=5e-4,
                   warmup_steps=10_000, schedule="linear", end_learning_rate_fraction=0.0,
                   b1=0.9, b2=0.98, eps=1e-6, clip_norm=2.0, weight_decay=0.01)
  return c
