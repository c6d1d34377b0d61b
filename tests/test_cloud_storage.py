"""Workdirs and prepared data on Cloud Storage (`gs://`), against a local emulator
(tests/gcs_emulator.py) on 127.0.0.1: a gs:// run resumes as an uninterrupted one,
amos-prepare writes to the bucket and the trainer reads from it, amos-export reads a
gs:// workdir, and no module writes a workdir path with local file calls."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests import gcs_emulator
from tests.train_helpers import (ROOT, TINY_FLAGS, corpus_and_tokenizer,  # noqa: F401
                                 env_for)

BUCKET = "amos-test"
_TIMING = ("step_time", "tokens_per_sec")


@pytest.fixture(scope="session")
def emulator_port(tmp_path_factory):
  """The emulator, and this process's gcsfs pointed at it, with local copies of gs://
  files in a temporary cache (environment restored after)."""
  proc, port = gcs_emulator.start(BUCKET)
  saved = {k: os.environ.get(k) for k in (*gcs_emulator.client_env(port), "AMOS_CACHE_DIR")}
  try:
    gcs_emulator.use_in_this_process(port)
    os.environ["AMOS_CACHE_DIR"] = str(tmp_path_factory.mktemp("gcs_cache"))
    yield port
  finally:
    proc.kill()
    proc.wait(timeout=10)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _env(port, tmp_path):
  return {**env_for(), **gcs_emulator.client_env(port),
          "AMOS_CACHE_DIR": str(tmp_path / "cache")}


def _cli(port, tmp_path, main, *args, timeout=300):
  """Runs `amos_jax.cli.<main>` with `args` in a fresh folder as the working directory."""
  cwd = tmp_path / "cwd"
  cwd.mkdir(exist_ok=True)
  r = subprocess.run([sys.executable, "-c", f"from amos_jax.cli import {main}; {main}()",
                      *args], env=_env(port, tmp_path), capture_output=True, text=True,
                     timeout=timeout, cwd=cwd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not any(p.startswith("gs") for p in os.listdir(cwd)), os.listdir(cwd)
  return r


def _train(port, tmp_path, workdir, corpus, *extra):
  return _cli(port, tmp_path, "train_main", *TINY_FLAGS, "--workdir", workdir,
              f"--config.data.corpus={corpus}", "--config.checkpoint.every=100",
              "--config.train.end_learning_rate_fraction=1.0", *extra)


def _metrics(workdir):
  from amos_jax.train.metrics import read_metrics
  return {r["step"]: {k: v for k, v in r.items() if k not in _TIMING}
          for r in read_metrics(workdir)}


def _names(path):
  from amos_jax import paths
  return sorted(p.name for p in paths.as_path(path).iterdir())


def test_gs_workdir_stop_and_resume_equals_uninterrupted(emulator_port, tmp_path,
                                                          corpus_and_tokenizer):
  corpus, _ = corpus_and_tokenizer  # no data.tokenizer: one is trained into the workdir
  full, cut = f"gs://{BUCKET}/resume/full", f"gs://{BUCKET}/resume/cut"
  _train(emulator_port, tmp_path, full, corpus, "--config.train.steps=5")
  _train(emulator_port, tmp_path, cut, corpus, "--config.train.steps=3")
  from amos_jax import paths
  tokenizer_before = paths.read_bytes(f"{cut}/tokenizer/spm.model")
  assert sorted(_metrics(cut)) == [1, 2, 3]
  rest = _train(emulator_port, tmp_path, cut, corpus, "--config.train.steps=5",
                "--allow_config_change")
  assert "resumed from checkpoint at step 3" in rest.stderr
  assert _metrics(cut) == _metrics(full)
  assert sorted(_metrics(cut)) == [1, 2, 3, 4, 5]
  assert _names(cut) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard",
                         "tokenizer"]
  assert {"3", "5"} <= set(_names(f"{cut}/checkpoints"))
  assert json.loads(paths.read_text(f"{cut}/config.json"))["train"]["steps"] == 5
  assert paths.read_bytes(f"{cut}/tokenizer/spm.model") == tokenizer_before
  events = _names(f"{cut}/tensorboard")
  assert events and all(e.startswith("events.out.tfevents") for e in events)
  # amos-export reads the gs:// workdir (config, checkpoint, tokenizer, metrics).
  from amos_jax.hf import export
  out = tmp_path / "export"
  export.main(["--workdir", cut, "--out", str(out)])
  assert not os.path.exists("gs:")
  assert json.loads((out / "config.json").read_text())["model_type"] == "electra"
  assert (out / "model.safetensors").stat().st_size > 0
  # init_from=hf:gs://... reads a folder in the bucket (through a local copy).
  from amos_jax.hf import load
  paths.copy_up(str(out), f"gs://{BUCKET}/hf")
  assert load.read_hf_config(f"hf:gs://{BUCKET}/hf") == load.read_hf_config(f"hf:{out}")
  got, want = load.read_state_dict(f"hf:gs://{BUCKET}/hf"), load.read_state_dict(str(out))
  assert sorted(got) == sorted(want) and all((got[k] == want[k]).all() for k in want)


def test_prepare_writes_to_the_bucket_and_the_pipeline_reads_it(
    emulator_port, tmp_path, corpus_and_tokenizer):
  from amos_jax import paths
  from amos_jax.data import pipeline, prepare
  corpus, tok = corpus_and_tokenizer
  remote = f"gs://{BUCKET}/prepared"
  _cli(emulator_port, tmp_path, "prepare_main", "--input", corpus, "--tokenizer", tok,
       "--out", remote, "--num-shards", "2", "--quiet", timeout=120)
  assert _names(remote) == ["manifest.json", "tokenizer", "tokens-00000-of-00002.array_record",
                            "tokens-00001-of-00002.array_record"]
  local = prepare.prepare([corpus], str(tmp_path / "local"), tokenizer=tok, num_shards=2,
                          progress=False)
  assert paths.read_json(f"{remote}/manifest.json")["checksum"] == local["checksum"]

  def batches(data_dir):
    it = pipeline.make_iterator(pipeline.PipelineConfig(
        data_dir=data_dir, seq_len=32, global_batch_size=4, seed=0, prefetch=0))
    return [next(it) for _ in range(2)]
  for got, want in zip(batches(remote), batches(str(tmp_path / "local"))):
    assert all((got[k] == want[k]).all() for k in want)
  from pathlib import Path
  cached = list(Path(paths.cache_root()).glob("remote/*/prepared/*.array_record"))
  assert len(cached) == 2


def test_path_layer_on_the_bucket(emulator_port, tmp_path):
  from amos_jax import paths
  base = f"gs://{BUCKET}/layer"
  paths.write_atomic(f"{base}/a.txt", "one")
  f = paths.AppendFile(f"{base}/m.jsonl")
  f.write("1\n")
  f.close()
  f = paths.AppendFile(f"{base}/m.jsonl")  # a resumed run keeps the earlier rows
  f.write("2\n")
  f.close()
  assert paths.read_text(f"{base}/m.jsonl") == "1\n2\n"
  first = paths.local_copy(base)
  assert sorted(os.listdir(first)) == ["a.txt", "m.jsonl"]
  paths.write_atomic(f"{base}/a.txt", "two")  # a new generation is fetched again
  with open(os.path.join(paths.local_copy(base), "a.txt")) as f:
    assert f.read() == "two"
  paths.rename(base, f"{base}-moved")  # how a corrupt checkpoint step is set aside
  assert not paths.exists(base) and _names(f"{base}-moved") == ["a.txt", "m.jsonl"]


# Calls that would treat a run path (workdir, checkpoints, prepared data) as local.
_LOCAL_CALL = re.compile(r"\bopen\(|os\.path\.\w+\(|os\.makedirs\(|os\.listdir\(|"
                         r"glob\.glob\(|os\.rename\(|os\.replace\(|shutil\.\w+\(")
_RUN_PATH = re.compile(r"workdir|ckpt_dir|manager\.directory|\bdata_dir\b|data\.prepared|"
                       r"\"checkpoints\"|\"tensorboard\"|metrics\.jsonl|METRICS_FILE")
# The genuinely local ones, each with why.
_ALLOWED = {
    # check_writable's local branch (gs:// returns before it).
    "amos_jax/train/workdir.py": ("os.path.exists(workdir)", "os.path.exists(parent)",
                                  "os.path.dirname(parent", "os.makedirs(workdir"),
    # A string comparison of --out with --workdir; touches no file.
    "amos_jax/hf/output.py": ("os.path.realpath(workdir)",),
    # Guarded by paths.is_local.
    "amos_jax/hf/export.py": ("os.path.abspath(ckpt_dir)", "os.path.abspath(workdir) if"),
    # After paths.local_copy: the local cache of gs:// shards.
    "amos_jax/data/records.py": ("os.path.expanduser(data_dir)",),
    # tfds's own data_dir (a local catalogue folder, not run output).
    "amos_jax/data/tfds_builder.py": ("os.path.expanduser(data_dir)",),
}


def test_no_module_reads_or_writes_a_run_path_with_local_file_calls():
  found = []
  for root, _, files in os.walk(os.path.join(ROOT, "amos_jax")):
    for name in files:
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(root, name), ROOT)
      with open(os.path.join(root, name), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          code = line.split("#", 1)[0]
          if _LOCAL_CALL.search(code) and _RUN_PATH.search(code) and not any(
              a in code for a in _ALLOWED.get(rel, ())):
            found.append(f"{rel}:{n}: {line.strip()}")
  assert not found, "use amos_jax.paths for run paths:\n" + "\n".join(found)
