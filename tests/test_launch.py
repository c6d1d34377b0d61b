"""Launch scripts: valid bash, usage on --help, one clear line on what is missing."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm.sbatch", "xla_flags_gpu.sh"]
BASH = shutil.which("bash")


def _bash(*args, env=None, cwd=None):
  return subprocess.run([BASH, *args], capture_output=True, text=True, timeout=60,
                        env=env, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_is_valid_bash(script):
  run = _bash("-n", str(LAUNCH / script))
  assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script):
  run = _bash(str(LAUNCH / script), "--help")
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith("usage:")


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sbatch"])
def test_missing_flag_is_one_error_line(script):
  run = _bash(str(LAUNCH / script), env={"PATH": os.environ["PATH"]})
  assert run.returncode == 2
  assert run.stderr.startswith("error: missing --") and run.stderr.count("\n") == 1


def _source_xla_flags(before=""):
  run = _bash("-c", 'source "$1" && printf %s "$XLA_FLAGS"', "_",
              str(LAUNCH / "xla_flags_gpu.sh"), env=dict(os.environ, XLA_FLAGS=before))
  assert run.returncode == 0, run.stderr
  return run.stdout


def test_xla_flags_exports_latency_hiding_scheduler():
  flags = _source_xla_flags("--xla_dump_to=/tmp/x").split()
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert any(f.startswith("--xla_gpu_all_reduce_combine_threshold_bytes=") for f in flags)
  # Flags the user had already come last, so they override ours.
  assert flags[-1] == "--xla_dump_to=/tmp/x"
  run = _bash(str(LAUNCH / "xla_flags_gpu.sh"))
  assert run.stdout.startswith("export XLA_FLAGS=") and "latency_hiding" in run.stdout


def test_xla_knows_every_flag():
  # An unknown flag in XLA_FLAGS aborts every JAX process; GPU flags parse on CPU too.
  env = dict(os.environ, XLA_FLAGS=_source_xla_flags(), JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(3).sum())"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0 and run.stdout.strip() == "3.0", run.stderr[-2000:]


def _fake_bin(tmp_path, name, body):
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text(f"#!{BASH}\n{body}\n")
  path.chmod(0o755)


def test_slurm_runs_one_process_per_task_with_a_coordinator(tmp_path):
  _fake_bin(tmp_path, "scontrol", "printf 'gpu-node-7\\ngpu-node-8\\n'")
  _fake_bin(tmp_path, "srun", 'echo "srun $*"; echo "coord=$JAX_COORDINATOR_ADDRESS"; '
            'echo "xla=$XLA_FLAGS"')
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "amos-train").write_text("")
  (venv / "bin" / "amos-train").chmod(0o755)
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "gpu-node-[7-8]"}
  run = _bash(str(LAUNCH / "slurm.sbatch"), "--config", "configs/amos.py:base",
              "--workdir", "/shared/run", "--repo-dir", str(LAUNCH.parent), "--venv", str(venv),
              "--", "--config.train.steps=10", env=env)
  assert run.returncode == 0, run.stderr
  lines = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line[:6])
  assert lines["coord"] == "gpu-node-7:24242"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in lines["xla"]
  srun = next(line for line in run.stdout.splitlines() if line.startswith("srun "))
  assert srun.endswith(f"{venv}/bin/amos-train --config configs/amos.py:base "
                       "--workdir /shared/run --config.train.steps=10")


def test_slurm_without_a_venv_says_how_to_install(tmp_path):
  _fake_bin(tmp_path, "scontrol", "echo n1")
  _fake_bin(tmp_path, "srun", "true")
  env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1"}
  run = _bash(str(LAUNCH / "slurm.sbatch"), "--config", "c", "--workdir", "w",
              "--venv", str(tmp_path / "none"), env=env)
  assert run.returncode == 2 and "make install" in run.stderr
  assert run.stderr.count("\n") == 1


def test_tpu_pod_without_gcloud_is_one_error_line(tmp_path):
  # A PATH with bash's basics but no gcloud.
  (tmp_path / "bin").mkdir()
  for tool in ("dirname", "cat"):
    (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
  run = _bash(str(LAUNCH / "tpu_pod.sh"), "--name", "n", "--zone", "z", "--config", "c",
              "--workdir", "gs://b/r", env={"PATH": str(tmp_path / "bin")})
  assert run.returncode == 2
  assert run.stderr == ("error: gcloud not found: install the Google Cloud CLI and run "
                        "'gcloud auth login'\n")


def test_tpu_pod_dry_run_creates_ships_installs_and_runs_on_all_workers():
  run = _bash(str(LAUNCH / "tpu_pod.sh"), "--name", "amos", "--zone", "us-east5-a",
              "--type", "v5p-16", "--spot", "--config", "configs/amos.py:base",
              "--workdir", "gs://b/run", "--teardown", "--dry-run", "--",
              "--config.train.steps=10")
  assert run.returncode == 0, run.stderr
  gcloud = [line for line in run.stdout.splitlines() if line.startswith("gcloud ")]
  verbs = [line.split()[4] for line in gcloud]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]
  assert "--accelerator-type=v5p-16" in gcloud[0] and "--spot" in gcloud[0]
  train = gcloud[4]
  assert "--worker=all" in train and "amos-train" in train
  assert "--config.train.steps=10" in train and "gs://b/run" in train
  assert "--worker=0" in gcloud[5] and "amos_train.log" in gcloud[5]
