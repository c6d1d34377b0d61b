"""Bad configs and flags stop with one line naming the field, before anything compiles
or touches the workdir; library code raises AmosError, only the CLI prints it."""
import subprocess
import sys

import pytest

from amos_jax import config as config_lib
from amos_jax.cli import train_main
from amos_jax.errors import AmosError, ConfigError
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
    ("train.batch_size", 0, 1, "train.batch_size=0 must be >= 1"),
    ("objective.name", "bert", 1, "objective.name='bert' is unknown"),
    ("train.grad_accum_steps", 3, 1, "not divisible by train.grad_accum_steps=3"),
    ("mesh.fsdp", -1, 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    ("objective.embedding_sharing", "some", 1, "objective.embedding_sharing='some'"),
    ("train.b2", 1.98, 1, "train.b2=1.98 must be in [0, 1)"),
    ("train.b1", -0.1, 1, "train.b1=-0.1 must be in [0, 1)"),
    ("train.eps", 0.0, 1, "train.eps=0.0 must be > 0"),
    ("objective.sampler", "greedy", 1, "objective.sampler='greedy'"),
    ("model.dropout_impl", "fast", 1, "model.dropout_impl='fast': use one of auto, xla, native"),
    ("model.layer_norm_impl", "fast", 1,
     "model.layer_norm_impl='fast': use one of auto, xla, native"),
    ("model.gelu_impl", "tanh", 1, "model.gelu_impl='tanh': use one of auto, xla, native"),
    ("model.attention_impl", "flash", 1,
     "model.attention_impl='flash': use one of auto, xla, cudnn, gemm, fused"),
])
def test_validate_names_the_field(field, value, devices, message):
  c = tiny_config("electra")
  _edit(c, field, value)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, devices)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_valid_config_passes():
  c = tiny_config("amos")
  c.mesh.update(data=2, fsdp=2, tensor=2)
  assert config_lib.validate(c, 8) == (2, 2, 2)


def test_batch_shards_follow_the_rules_table():
  """The batch splits over the mesh axes the rules table's `batch` entry names."""
  c = tiny_config("electra")
  c.mesh.update(data=2, fsdp=2, tensor=1)
  c.train.batch_size = 6
  with pytest.raises(ConfigError, match="4 data shards"):
    config_lib.validate(c, 4)
  c.sharding.rules = tuple((k, "data" if k == "batch" else v) for k, v in c.sharding.rules)
  config_lib.validate(c, 4)  # 6 rows over data=2 only


def _train_cli(capsys, *argv):
  """amos-train in-process: (exit code, stderr lines)."""
  with pytest.raises(SystemExit) as e:
    train_main(list(argv))
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  return e.value.code, err


def _bad_config_file(tmp_path, text):
  path = tmp_path / "bad.py"
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("case, expected", [
    ("syntax", "syntax error"),
    ("no_get_config", "defines no get_config"),
    ("unknown_key", "did you mean --config.train.steps?"),
    ("bad_size", "configs/amos.py:huge is not a model size"),
    ("bad_value", "--config.train.steps='many': not a valid int"),
    ("missing_file", "--config: no such file"),
    ("workdir_is_file", "is a file"),
    ("workdir_under_file", "sits under the file"),
    ("zero_batch", "train.batch_size=0 must be >= 1"),
])
def test_amos_train_bad_input_is_one_error_line(tmp_path, capsys, case, expected):
  config = f"{ROOT}/configs/electra.py:tiny"
  workdir = str(tmp_path / "run")
  extra = []
  if case == "syntax":
    config = _bad_config_file(tmp_path, "def get_config(:\n  pass\n")
  elif case == "no_get_config":
    config = _bad_config_file(tmp_path, "X = 1\n")
  elif case == "unknown_key":
    extra = ["--config.train.step=5"]
  elif case == "bad_size":
    config = f"{ROOT}/configs/amos.py:huge"
  elif case == "bad_value":
    extra = ["--config.train.steps=many"]
  elif case == "missing_file":
    config = f"{ROOT}/configs/nope.py:base"
  elif case == "workdir_is_file":
    (tmp_path / "run").write_text("mine")
  elif case == "workdir_under_file":
    (tmp_path / "file").write_text("mine")
    workdir = str(tmp_path / "file" / "run")
  elif case == "zero_batch":
    extra = ["--config.train.batch_size=0"]
  code, err = _train_cli(capsys, "--config", config, "--workdir", workdir, *extra)
  assert code == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert expected in err[0], err
  if case == "workdir_is_file":
    assert (tmp_path / "run").read_text() == "mine"
  else:
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_library_errors_are_catchable():
  """From a notebook: one `except AmosError` catches what the CLI would print."""
  with pytest.raises(AmosError):
    config_lib.load_config_file(f"{ROOT}/configs/amos.py:huge")
  c = config_lib.load_config_file(f"{ROOT}/configs/electra.py:tiny")
  with pytest.raises(AmosError, match="did you mean --config.model.hidden_size"):
    config_lib.apply_overrides(c, [("model.hiden_size", "64")])


def test_config_is_frozen_after_loading(capsys):
  from amos_jax.cli import parse_train_args
  _, c = parse_train_args(["--config", f"{ROOT}/configs/electra.py:tiny",
                           "--workdir", "x", "--config.train.steps=7"])
  assert c.train.steps == 7
  with pytest.raises((AttributeError, TypeError, ValueError)):
    c.train.steps = 8


@pytest.mark.parametrize("flag, field", [
    ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.mesh.data=3", "mesh.data"),
])
def test_amos_train_prints_one_error_line(tmp_path, flag, field):
  r = subprocess.run([sys.executable, "-m", "amos_jax.cli", *TINY_FLAGS, flag,
                      "--workdir", str(tmp_path)], env=env_for(2), capture_output=True,
                     text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert lines[-1].startswith("error: ") and field in lines[-1], r.stderr[-2000:]
  assert not (tmp_path / "checkpoints").exists()


def test_no_tpu_runtime_banner_on_a_machine_without_tpus(tmp_path):
  """With libtpu installed (test extra) and no TPU, a CPU run must not start the TPU
  runtime: its start-up banner would be the user's first sight of every run."""
  (tmp_path / "run").write_text("mine")
  env = env_for()
  env.pop("JAX_PLATFORMS")
  r = subprocess.run([sys.executable, "-m", "amos_jax.cli", *TINY_FLAGS, "--workdir",
                      str(tmp_path / "run")], env=env, capture_output=True, text=True,
                     timeout=120, cwd=ROOT)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      f"error: --workdir {tmp_path / 'run'} is a file; give a folder (new or an earlier "
      "run's)"], r.stderr[-3000:]


def test_warmup_fraction_and_the_long_warmup_warning(caplog):
  from amos_jax.train.loop import _warn_about_schedule
  from amos_jax.train.state import learning_rate_schedule
  c = tiny_config("electra")
  c.train.update(steps=100, warmup_steps=1000, learning_rate=1e-3)
  with caplog.at_level("WARNING", logger="amos_jax"):
    _warn_about_schedule(c.train, True)
  assert "train.warmup_fraction" in caplog.text
  c.train.warmup_fraction = 0.1
  schedule = learning_rate_schedule(c.train)
  assert abs(float(schedule(5)) - 5e-4) < 1e-9 and abs(float(schedule(10)) - 1e-3) < 1e-9
  assert config_lib.warmup_steps(c.train) == 10
