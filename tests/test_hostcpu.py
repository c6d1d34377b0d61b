"""One JAX device per CPU core (amos_jax/hostcpu.py): the environment it reads, that it
sizes a fresh process's CPU client and leaves a user's own count alone, and that
amos-train keeps one device unless asked, and trains to the same losses split."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

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


def test_training_splits_only_when_asked_and_then_trains_to_the_same_losses(
    tmp_path, corpus_and_tokenizer):  # noqa: F811
  """amos-train under `auto` keeps one device; asked for two CPU devices, it splits
  the batch over them as the data axis: the same rows, so the same losses up to
  summation order."""
  runs = {}
  for asked, devices in (("auto", "1"), ("2", "2")):
    work = tmp_path / asked
    r = subprocess.run(train_cmd(work, corpus_and_tokenizer, "--config.train.steps=4",
                                 "--config.checkpoint.every=4"),
                       env=env_for_host(asked), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    mesh = re.search(r"mesh \{'data': (\d+)", r.stderr)
    assert mesh and mesh.group(1) == devices, r.stderr[-2000:]
    runs[devices] = [x["loss"] for x in read_metrics(str(work)) if "loss" in x]
  assert len(runs["1"]) == 4
  assert runs["2"] == pytest.approx(runs["1"], rel=1e-5)


# ------------------------------------------------- one process per core (training)
@pytest.mark.parametrize("value,count", [("", 1), ("1", 1), ("3", 3), (" 2 ", 2)])
def test_requested_processes_reads_the_environment(value, count):
  assert hostcpu.requested_processes({hostcpu.PROCESSES_ENV: value}) == count


def test_auto_processes_are_one_per_core():
  assert hostcpu.requested_processes({hostcpu.PROCESSES_ENV: "auto"}) == hostcpu.host_cores()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_process_count_is_one_error_naming_the_variable_and_the_fix(value):
  with pytest.raises(ConfigError, match=f"{hostcpu.PROCESSES_ENV}=.*positive integer"):
    hostcpu.requested_processes({hostcpu.PROCESSES_ENV: value})


def test_core_blocks_split_the_cores_evenly_and_apart():
  assert hostcpu.core_blocks(2, [0, 1]) == [{0}, {1}]
  assert hostcpu.core_blocks(2, [4, 5, 6, 7]) == [{4, 5}, {6, 7}]
  assert hostcpu.core_blocks(2, [0, 1, 2]) == [{0}, {1, 2}]
  with pytest.raises(ConfigError, match="exceeds the 2 cores.*use at most 2"):
    hostcpu.core_blocks(3, [0, 1])


_CHILD = """
import json, os, sys, threading, time
from amos_jax import hostcpu
pid = int(os.environ["JAX_PROCESS_ID"])
started = sorted(os.sched_getaffinity(0))
worker = threading.Thread(target=time.sleep, args=(2,))  # a pool thread, say
worker.start()
hostcpu.settle_on_cores()
hostcpu.settle_on_cores()  # the second time: nothing
print(json.dumps(dict(pid=pid, started=started, cores=sorted(os.sched_getaffinity(0)),
                      worker=sorted(os.sched_getaffinity(worker.native_id)),
                      n=os.environ["JAX_NUM_PROCESSES"], nproc=os.environ.get("NPROC"),
                      address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      env=os.environ.get("AMOS_JAX_CPU_PROCESSES"))), flush=True)
if sys.argv[1] == "fail" and pid == 1:
  sys.exit(3)
time.sleep(float(sys.argv[2]))
"""


def test_run_processes_gives_each_its_cores(tmp_path, capfd, monkeypatch):
  import json
  monkeypatch.setenv(hostcpu.PROCESSES_ENV, "2")
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    pytest.fail("this test needs a host with at least 2 cores")
  assert hostcpu.run_processes(2, [sys.executable, "-c", _CHILD, "ok", "0"]) == 0
  seen = sorted((json.loads(line) for line in capfd.readouterr().out.splitlines()),
                key=lambda r: r["pid"])
  assert [r["pid"] for r in seen] == [0, 1]
  blocks = hostcpu.core_blocks(2)
  # Process 0 starts on every core to compile for both, its thread pool sized by
  # NPROC, then settles on its block, every thread of it; process 1 starts pinned.
  assert set(seen[0]["started"]) == set(cores) and seen[0]["nproc"] == str(len(blocks[0]))
  assert set(seen[1]["started"]) == blocks[1]
  assert [set(r["cores"]) for r in seen] == [set(r["worker"]) for r in seen] == blocks
  assert {r["address"] for r in seen} == {seen[0]["address"]}
  assert all(r["n"] == "2" and r["env"] is None for r in seen)  # no second launch


def test_run_processes_stops_the_others_when_one_fails():
  import time
  start = time.monotonic()
  # Process 1 exits with 3 at once; process 0 would sleep 60 s, and is stopped.
  assert hostcpu.run_processes(2, [sys.executable, "-c", _CHILD, "fail", "60"]) == 3
  assert time.monotonic() - start < 30


@pytest.mark.parametrize("command", ["amos_jax.cli", "bench"])
def test_a_config_that_does_not_fit_the_processes_is_one_error_before_any_starts(
    tmp_path, command):
  """A batch of 3 rows over AMOS_JAX_CPU_PROCESSES=2: amos-train and amos-bench check
  the config against the processes' devices before starting them, so the error is
  one line (not one per process) and nothing is written."""
  from amos_jax.train import bench
  args = ["--config", f"{ROOT}/configs/electra.py:tiny", "--config.train.batch_size=3"]
  cmd = ([sys.executable, "-m", "amos_jax.cli", *args, "--workdir", str(tmp_path / "w")]
         if command == "amos_jax.cli" else [sys.executable, "-c", bench._CHILD, *args])
  r = subprocess.run(cmd, env=dict(env_for_host("1"), AMOS_JAX_CPU_PROCESSES="2"),
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert "train.batch_size=3" in errors[0] and "use a multiple of 2" in errors[0]
  assert "JAX_PROCESS_ID" not in r.stderr and not (tmp_path / "w").exists()


_SHARED_COMPILE = """
import json, os, sys
import numpy as np
from amos_jax import hostcpu
from amos_jax.train.distributed import maybe_initialize_distributed
import jax
from jax._src import compiler  # counts XLA compiles: the probe, not the code tested
compiles = []
real_compile = compiler.backend_compile_and_load
def counting(backend, module, *args, **kwargs):
  compiles.append(str(module.operation.attributes["sym_name"]))
  return real_compile(backend, module, *args, **kwargs)
compiler.backend_compile_and_load = counting
if sys.argv[2] == "launcher":  # as processes another launcher started
  del os.environ[hostcpu.ONE_HOST_ENV]
maybe_initialize_distributed()
if sys.argv[1]:  # else no persistent cache, as amos-train with compilation_cache_dir=''
  jax.config.update("jax_compilation_cache_dir", sys.argv[1])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
shared = hostcpu.share_compiles()
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
mine = rows[2 * jax.process_index():2 * jax.process_index() + 2]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), mine)
f = jax.jit(lambda x: (jax.numpy.tanh(x) @ x.T).sum(), out_shardings=NamedSharding(mesh, P()))
value = float(f(x))
print(json.dumps(dict(pid=jax.process_index(), shared=shared,
                      compiles=sum("lambda" in name for name in compiles),
                      value=value)), flush=True)
"""


def _run_shared_compile(cache, started_by="start_processes"):
  import json
  procs = hostcpu.start_processes(
      2, [sys.executable, "-c", _SHARED_COMPILE, str(cache), started_by],
      # A key process 1 never finds fails the test in a minute, not in JAX's 20.
      environ=dict(env_for_host("1"), JAX_SHARE_BINARY_BETWEEN_HOSTS_TIMEOUT_MS="60000"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  outs = [p.communicate(timeout=180) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_processes_on_one_host_compile_once_and_share_the_cache(tmp_path):
  """`share_compiles`: process 0 compiles a program the processes run together and
  process 1 loads its executable instead of compiling, with or without a persistent
  cache; with the cache warm, both load it from there (JAX alone keys it per
  process, so process 1 compiled every program afresh on every run)."""
  rows = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
  expected = float((np.tanh(rows) @ rows.T).sum())
  no_cache = _run_shared_compile("")
  assert [r["compiles"] for r in no_cache] == [1, 0]
  assert all(abs(r["value"] - expected) < 1e-5 for r in no_cache)
  cold = _run_shared_compile(tmp_path / "cache")
  assert [r["shared"] for r in cold] == [True, True]
  assert [r["compiles"] for r in cold] == [1, 0]
  assert all(abs(r["value"] - expected) < 1e-5 for r in cold)
  warm = _run_shared_compile(tmp_path / "cache")
  assert [r["compiles"] for r in warm] == [0, 0]
  assert all(abs(r["value"] - expected) < 1e-5 for r in warm)
  # Processes not started by `start_processes` (a launcher, other hosts) are left
  # to JAX: each compiles its own.
  alone = _run_shared_compile("", "launcher")
  assert [r["shared"] for r in alone] == [False, False]
  assert [r["compiles"] for r in alone] == [1, 1]
