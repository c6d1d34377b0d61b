"""Preemption and resume through `amos-train`: SIGTERM then rerun reproduces the
uninterrupted run; a checkpoint resumes on another mesh; a corrupt newest
checkpoint is skipped."""
import os
import shutil
import signal
import subprocess
import sys
import time

from amos_jax.train.metrics import read_metrics
from tests.train_helpers import (ROOT, corpus_and_tokenizer, env_for,  # noqa: F401
                                 run_train, train_cmd)

_TIMING = ("step_time", "tokens_per_sec")


def _by_step(workdir):
  """The last record logged for each step, without wall-clock fields."""
  return {r["step"]: {k: v for k, v in r.items() if k not in _TIMING}
          for r in read_metrics(str(workdir))}


def test_sigterm_then_rerun_equals_uninterrupted(tmp_path, corpus_and_tokenizer):
  # A constant learning rate after warmup: the cut run is launched with more steps
  # (so that it is still running when the signal comes) but must follow the same
  # schedule.
  # 30 steps: the tiny steps are fast, and the cut run must stop before the end.
  total = 30
  steps = (f"--config.train.steps={total}", "--config.checkpoint.every=100",
           "--config.train.end_learning_rate_fraction=1.0")
  full = run_train(tmp_path / "full", corpus_and_tokenizer, *steps)
  assert full.returncode == 0, full.stderr[-3000:]

  work = tmp_path / "cut"
  proc = subprocess.Popen(train_cmd(work, corpus_and_tokenizer, *steps,
                                    "--config.train.steps=200"),
                          env=env_for(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "termination requested: saving step" in err
  stopped = max(_by_step(work))
  assert 3 <= stopped < total, stopped
  assert os.path.isdir(work / "checkpoints" / str(stopped))

  # The cut run was launched with more steps: continuing it with fewer is a safe change.
  rerun = run_train(work, corpus_and_tokenizer, *steps, "--allow_config_change")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from checkpoint at step {stopped}" in rerun.stderr
  want, got = _by_step(tmp_path / "full"), _by_step(work)
  assert sorted(got) == list(range(1, total + 1))
  # Every step is logged once: rows past the checkpoint were dropped on resume.
  steps_logged = [r["step"] for r in read_metrics(str(work))]
  assert steps_logged == sorted(set(steps_logged)), steps_logged
  for s in range(1, total + 1):
    assert got[s] == want[s], (s, got[s], want[s])


def test_saved_on_8_devices_resumes_on_4_with_another_split(tmp_path,
                                                           corpus_and_tokenizer):
  first = run_train(tmp_path / "a", corpus_and_tokenizer, "--config.train.steps=3",
                    "--config.mesh.data=-1", devices=8)
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  same = run_train(tmp_path / "a", corpus_and_tokenizer, "--config.train.steps=5",
                   "--config.mesh.data=-1", "--allow_config_change", devices=8)
  other = run_train(tmp_path / "b", corpus_and_tokenizer, "--config.train.steps=5",
                    "--config.mesh.data=1", "--config.mesh.fsdp=2",
                    "--config.mesh.tensor=2", "--allow_config_change", devices=4)
  for r in (same, other):
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint at step 3" in r.stderr
  a, b = _by_step(tmp_path / "a"), _by_step(tmp_path / "b")
  for s in (4, 5):
    for k in ("loss", "mlm_loss", "rtd_loss", "grad_norm"):
      assert abs(a[s][k] - b[s][k]) <= 1e-4 * abs(a[s][k]) + 1e-6, (s, k, a[s], b[s])


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, corpus_and_tokenizer):
  work = tmp_path / "w"
  first = run_train(work, corpus_and_tokenizer, "--config.train.steps=4",
                    "--config.checkpoint.every=2")
  assert first.returncode == 0, first.stderr[-3000:]
  newest = work / "checkpoints" / "4"
  assert newest.is_dir() and (work / "checkpoints" / "2").is_dir()
  # Truncate every array file of the newest step, as a crash mid-write could.
  for root, _, files in os.walk(newest / "state"):
    for f in files:
      if not f.endswith((".json", "_METADATA")):
        open(os.path.join(root, f), "w").close()
  rerun = run_train(work, corpus_and_tokenizer, "--config.train.steps=5",
                    "--config.checkpoint.every=2", "--allow_config_change")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "checkpoint at step 4 is incomplete or corrupt" in rerun.stderr
  assert "resumed from checkpoint at step 2" in rerun.stderr
  assert (work / "checkpoints" / "4.corrupt").is_dir()
  assert (work / "checkpoints" / "5").is_dir()


def test_prepared_data_resume_sees_the_same_batches(tmp_path, corpus_and_tokenizer):
  """amos-prepare shards through the grain pipeline: the iterator state travels in
  the checkpoint, so stop + resume trains on exactly the uninterrupted batches."""
  corpus, tok = corpus_and_tokenizer
  prepared = tmp_path / "prepared"
  r = subprocess.run([sys.executable, "-c", "from amos_jax.cli import prepare_main; "
                      "prepare_main()", "--input", corpus,
                      "--tokenizer", tok, "--out", str(prepared), "--num-shards", "2",
                      "--quiet"], env=env_for(), capture_output=True, text=True,
                     timeout=120, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  flags = (f"--config.data.prepared={prepared}", "--config.checkpoint.every=3",
           "--config.train.end_learning_rate_fraction=1.0")
  full = run_train(tmp_path / "full", corpus_and_tokenizer, *flags,
                   "--config.train.steps=6")
  assert full.returncode == 0, full.stderr[-3000:]
  work = tmp_path / "cut"
  first = run_train(work, corpus_and_tokenizer, *flags, "--config.train.steps=3")
  assert first.returncode == 0, first.stderr[-3000:]
  rest = run_train(work, corpus_and_tokenizer, *flags, "--config.train.steps=6",
                   "--allow_config_change")
  assert rest.returncode == 0, rest.stderr[-3000:]
  assert "resumed from checkpoint at step 3" in rest.stderr
  want, got = _by_step(tmp_path / "full"), _by_step(work)
  for s in (4, 5, 6):
    assert got[s] == want[s], (s, got[s], want[s])
