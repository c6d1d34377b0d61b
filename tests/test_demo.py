"""`configs/demo.py` end to end on the embedded corpus (a few steps): the workdir
contract (metrics.jsonl keys, TensorBoard events, checkpoints, tokenizer, config)."""
import glob
import json
import math
import os
import subprocess
import sys

from amos_jax.train.metrics import read_metrics
from tests.train_helpers import ROOT, env_for


def test_demo_config_trains_on_the_embedded_corpus(tmp_path):
  work = tmp_path / "demo"
  cmd = [sys.executable, "-m", "amos_jax.cli", "--config",
         os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(work),
         # Fewer and smaller steps than the demo itself; same model and data path.
         "--config.train.steps=12", "--config.train.warmup_steps=2",
         "--config.train.batch_size=8", "--config.train.seq_len=64",
         "--config.train.log_every=1", "--config.train.eval_every=12",
         "--config.train.eval_batches=1", "--config.model.vocab_size=1000"]
  r = subprocess.run(cmd, env=env_for(), capture_output=True, text=True, timeout=600,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  records = read_metrics(str(work))
  train = [x for x in records if "loss" in x]
  assert [x["step"] for x in train] == list(range(1, 13))
  # Every logged value is finite, and training lowers the loss.
  assert all(math.isfinite(v) for x in records for v in x.values()), records
  first, last = (sum(x["loss"] for x in part) / 3 for part in (train[:3], train[-3:]))
  assert last < first, (first, last)
  for key in ("loss", "mlm_loss", "rtd_loss", "rtd_accuracy", "mlm_loss_2", "mlm_loss_4",
              "mixture_weight_2", "mixture_weight_3", "mixture_weight_4", "grad_norm",
              "learning_rate", "step_time", "tokens_per_sec"):
    assert key in train[-1], key
  weights = sum(train[-1][f"mixture_weight_{l}"] for l in (2, 3, 4))
  assert abs(weights - 1.0) < 1e-4
  assert any("eval_loss" in x and x["step"] == 12 for x in records)
  assert glob.glob(str(work / "tensorboard" / "events.out.tfevents.*"))
  assert os.path.isdir(work / "checkpoints" / "12")
  assert os.listdir(work / "tokenizer")
  with open(work / "config.json") as f:
    assert json.load(f)["objective"]["name"] == "amos"
