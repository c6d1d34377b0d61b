"""Two processes joined by jax.distributed on localhost train the same steps as one
process with the same global batch."""
import socket
import subprocess

from amos_jax.train.metrics import read_metrics
from tests.train_helpers import (ROOT, corpus_and_tokenizer, env_for,  # noqa: F401
                                 run_train, train_cmd)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, corpus_and_tokenizer):
  steps = ("--config.train.steps=3", "--config.checkpoint.every=100")
  one = run_train(tmp_path / "one", corpus_and_tokenizer, *steps, devices=2)
  assert one.returncode == 0, one.stderr[-3000:]

  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      train_cmd(tmp_path / "two", corpus_and_tokenizer, *steps,
                f"--coordinator_address={address}", "--num_processes=2",
                f"--process_id={pid}"),
      env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
      for pid in (0, 1)]
  errs = []
  try:
    for p in procs:
      _, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
      errs.append(err)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  a, b = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
  assert [r["step"] for r in b] == [1, 2, 3]  # process 0 alone writes metrics
  for x, y in zip(a, b):
    for k in ("loss", "mlm_loss", "rtd_loss", "grad_norm"):
      assert abs(x[k] - y[k]) <= 1e-5 * abs(x[k]) + 1e-6, (k, x, y)
  assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
  # CPU processes reduce their gradients in one all-reduce per step (auto); the
  # one-process run above lets the partitioner place them, and trains the same.
  assert "one flat all-reduce per step over 2 devices" in errs[0], errs[0][-3000:]
