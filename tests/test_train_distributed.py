"""Two processes joined by jax.distributed on localhost train the same steps as one
process with the same global batch."""
import subprocess

from amos_jax.train.metrics import read_metrics
from tests.train_helpers import (ROOT, corpus_and_tokenizer, env_for,  # noqa: F401
                                 run_train, train_cmd)


def test_two_processes_train_like_one(tmp_path, corpus_and_tokenizer):
  steps = ("--config.train.steps=3", "--config.checkpoint.every=100")
  one = run_train(tmp_path / "one", corpus_and_tokenizer, *steps, devices=2)
  assert one.returncode == 0, one.stderr[-3000:]

  # AMOS_JAX_CPU_PROCESSES=2: amos-train starts two processes itself
  # (amos_jax/hostcpu.py), which join on localhost as any multi-process run does;
  # process 0 compiles for both (hostcpu.share_compiles), and they train alike.
  env = dict(env_for(1), AMOS_JAX_CPU_PROCESSES="2")
  two = subprocess.run(train_cmd(tmp_path / "two", corpus_and_tokenizer, *steps), env=env,
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert two.returncode == 0, two.stderr[-3000:]
  a, b = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
  assert [r["step"] for r in b] == [1, 2, 3]  # process 0 alone writes metrics
  for x, y in zip(a, b):
    for k in ("loss", "mlm_loss", "rtd_loss", "grad_norm"):
      assert abs(x[k] - y[k]) <= 1e-5 * abs(x[k]) + 1e-6, (k, x, y)
  assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
  # CPU processes reduce their gradients in one all-reduce per step (auto); the
  # one-process run above lets the partitioner place them, and trains the same.
  assert "one flat all-reduce per step over 2 devices" in two.stderr, two.stderr[-3000:]
  assert "process 0 compiles for all 2 processes" in two.stderr
