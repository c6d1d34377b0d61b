"""Bad configs stop with one line naming the field, before anything compiles."""
import subprocess
import sys

import pytest

from amos_jax import config as config_lib
from tests.helpers import tiny_config
from tests.train_helpers import ROOT, TINY_FLAGS, env_for


def _edit(c, path, value):
  *parents, leaf = path.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


@pytest.mark.parametrize("field, value, devices, message", [
    ("model.num_heads", 3, 1, "model.num_heads=3 does not divide model.hidden_size=32"),
    ("mesh.data", 4, 8, "does not match the 8 devices"),
    ("train.batch_size", 6, 4, "train.batch_size=6 (per micro-batch 6) does not divide "
                               "over the 4 data shards"),
    ("objective.name", "bert", 1, "objective.name='bert' is unknown"),
    ("train.grad_accum_steps", 3, 1, "not divisible by train.grad_accum_steps=3"),
    ("mesh.fsdp", -1, 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
])
def test_validate_names_the_field(field, value, devices, message):
  c = tiny_config("electra")
  _edit(c, field, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, devices)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_valid_config_passes():
  c = tiny_config("amos")
  c.mesh.update(data=2, fsdp=2, tensor=2)
  assert config_lib.validate(c, 8) == (2, 2, 2)


@pytest.mark.parametrize("flag, field", [
    ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.mesh.data=3", "mesh.data"),
])
def test_amos_train_prints_one_error_line(tmp_path, flag, field):
  r = subprocess.run([sys.executable, "-m", "amos_jax.cli", *TINY_FLAGS, flag,
                      "--workdir", str(tmp_path)], env=env_for(2), capture_output=True,
                     text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 1
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert lines[-1].startswith("error: ") and field in lines[-1], r.stderr[-2000:]
  assert not (tmp_path / "checkpoints").exists()


def test_missing_config_file_is_one_error_line(tmp_path):
  r = subprocess.run([sys.executable, "-c", "from amos_jax.cli import train_main; "
                      "train_main()", "--config", "configs/nope.py:base", "--workdir",
                      str(tmp_path)], capture_output=True, text=True, timeout=120,
                     cwd=ROOT, env=env_for())
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --config: no such file")
