"""One JAX device per CPU core (amos_jax/hostcpu.py): the count `auto` picks, that it
sizes a fresh process's CPU client and leaves a user's own count alone, and that a
run split over host devices trains to the same losses as on one device."""
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from amos_jax import config as config_lib
from amos_jax import hostcpu
from amos_jax.errors import ConfigError
from amos_jax.train.metrics import read_metrics
from tests.train_helpers import ROOT, corpus_and_tokenizer, env_for_host, train_cmd  # noqa: F401


@pytest.mark.parametrize("value, count", [("", None), ("auto", None), (" AUTO ", None),
                                          ("1", 1), ("3", 3)])
def test_requested_devices_reads_the_environment(value, count):
  assert hostcpu.requested_devices({hostcpu.ENV: value}) == count


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_device_count_is_one_error_naming_the_variable_and_the_fix(value):
  with pytest.raises(ConfigError) as e:
    hostcpu.requested_devices({hostcpu.ENV: value})
  message = str(e.value)
  assert hostcpu.ENV in message and repr(value) in message and "auto" in message
  assert "\n" not in message


def _config(batch_size=32, grad_accum_steps=1, **mesh) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.train.batch_size, c.train.grad_accum_steps = batch_size, grad_accum_steps
  c.mesh.update(mesh)
  return c


@pytest.mark.parametrize("config, cores, count", [
    (_config(32), 2, 2),
    (_config(32), 1, 1),
    (_config(3), 2, 1),                      # an odd batch stays on one device
    (_config(12), 8, 6),                     # the largest divisor up to the cores
    (_config(8, grad_accum_steps=4), 8, 2),  # the micro-batch is what splits
    (_config(32, data=1, fsdp=-1), 4, 4),    # fsdp carries the batch too
    (_config(32, data=-1, fsdp=2), 4, 1),    # a fixed axis: the user's own mesh
    (_config(32, data=1, tensor=-1), 4, 1),  # the free axis does not carry the batch
    (_config(32, data=2), 4, 1),             # no free axis
])
def test_auto_splits_only_what_divides_the_batch(config, cores, count):
  assert hostcpu.devices_for_config(config, cores=cores) == count
  if count > 1:  # the split passes the trainer's own check of the mesh and batch
    config_lib.validate(config_lib.freeze(config), count)


_SPLIT = """
import sys
from amos_jax import hostcpu
set_to = hostcpu.split_host(int(sys.argv[1]) if len(sys.argv) > 1 else None)
import jax
print(set_to, len(jax.devices("cpu")), hostcpu.host_cores())
"""


def _split(args=(), cores=None, **env_changes):
  env = env_for_host()
  env.update(env_changes)
  r = subprocess.run(
      [sys.executable, "-c", _SPLIT, *map(str, args)], env=env, capture_output=True,
      text=True, timeout=120, cwd=ROOT,
      preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
  assert r.returncode == 0, r.stderr[-2000:]
  return tuple(int(x) for x in r.stdout.split())


def test_split_host_sizes_a_fresh_cpu_client():
  # auto with the count the caller computed; an explicit count wins over it.
  assert _split([3]) == (3, 3, hostcpu.host_cores())
  assert _split([3], AMOS_JAX_CPU_DEVICES="2")[:2] == (2, 2)
  # One device asked for, or a count the user gave JAX already: left alone.
  assert _split([3], AMOS_JAX_CPU_DEVICES="1")[:2] == (0, 1)
  assert _split([3], XLA_FLAGS="--xla_force_host_platform_device_count=5")[:2] == (0, 5)


def test_auto_counts_the_cores_the_process_may_run_on():
  one_core = {sorted(os.sched_getaffinity(0))[0]}
  assert _split(cores=one_core) == (0, 1, 1)
  cores = len(os.sched_getaffinity(0))
  assert _split()[1:] == (cores, cores)


def test_a_run_split_over_host_devices_trains_to_the_same_losses(
    tmp_path, corpus_and_tokenizer):  # noqa: F811
  """amos-train with two CPU devices (`auto` on a 2-core host) splits the batch over
  them as the data axis: the same rows, so the same losses up to summation order."""
  runs = {}
  for devices in ("1", "2"):
    work = tmp_path / devices
    r = subprocess.run(train_cmd(work, corpus_and_tokenizer, "--config.train.steps=4",
                                 "--config.checkpoint.every=4"),
                       env=env_for_host(devices), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    mesh = re.search(r"mesh \{'data': (\d+)", r.stderr)
    assert mesh and mesh.group(1) == devices, r.stderr[-2000:]
    runs[devices] = [x["loss"] for x in read_metrics(str(work)) if "loss" in x]
  assert len(runs["1"]) == 4
  assert runs["2"] == pytest.approx(runs["1"], rel=1e-5)
