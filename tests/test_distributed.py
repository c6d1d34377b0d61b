"""Multi-process runs: launcher detection and a real 2-process job on localhost."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from amos_jax.train import distributed

# Launcher variables that would make the detection see a cluster that is not there.
_LAUNCHER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
    "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_NUM_SLICES")


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them."""
  for name in _LAUNCHER_VARS:
    monkeypatch.delenv(name, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed, "_tpu_process_count", lambda: None)
  return made


def test_single_process_is_a_no_op(calls):
  assert distributed.maybe_initialize_distributed() == 1
  assert distributed.maybe_initialize_distributed(num_processes=1) == 1
  assert calls == []


def test_explicit_flags_initialize(calls):
  distributed.maybe_initialize_distributed("10.0.0.1:1234", 4, 3)
  assert calls[0]["coordinator_address"] == "10.0.0.1:1234"
  assert (calls[0]["num_processes"], calls[0]["process_id"]) == (4, 3)


def test_bad_process_id_is_one_clear_error(calls):
  with pytest.raises(ValueError, match="process_id=4 must be in"):
    distributed.maybe_initialize_distributed("10.0.0.1:1234", 4, 4)


@pytest.mark.parametrize("env, initialized", [
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_NTASKS": "8"}, True),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False),
    # The batch script itself, outside srun: no step, so no peers to wait for.
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, False),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_launcher_detection(calls, monkeypatch, env, initialized):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.maybe_initialize_distributed()
  assert bool(calls) == initialized
  if initialized:
    # jax.distributed fills what the launcher knows; nothing is guessed here.
    assert calls[0]["num_processes"] is None


@pytest.mark.parametrize("platforms, gloo", [("cpu", True), ("tpu", False)])
def test_cpu_run_uses_gloo(calls, monkeypatch, platforms, gloo):
  monkeypatch.delenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", raising=False)
  before = jax.config.jax_platforms
  jax.config.update("jax_platforms", platforms)
  updates = []
  try:
    monkeypatch.setattr(jax.config, "update", lambda k, v: updates.append((k, v)))
    distributed.maybe_initialize_distributed("127.0.0.1:1", 2, 0)
  finally:
    monkeypatch.undo()
    jax.config.update("jax_platforms", before)
  assert (("jax_cpu_collectives_implementation", "gloo") in updates) == gloo


_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from amos_jax.train.distributed import maybe_initialize_distributed, is_primary

    address, pid = sys.argv[1], int(sys.argv[2])
    n = maybe_initialize_distributed(address, 2, pid, initialization_timeout=30)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    jax.set_mesh(mesh)
    # Each process holds its own rows of a (8, 3) global array: rows 4*pid .. 4*pid+3.
    local = np.arange(12, dtype=np.float32).reshape(4, 3) + 12 * pid
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, (8, 3))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    col = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps(dict(n=n, primary=is_primary(), devices=len(jax.devices()),
                          local_devices=len(jax.local_devices()), total=float(total),
                          col=np.asarray(col).tolist())))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_see_the_global_sum():
  env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(pid)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=120)
      assert p.returncode == 0, err[-3000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [r["primary"] for r in results] == [True, False]
  for r in results:
    assert (r["n"], r["devices"], r["local_devices"]) == (2, 4, 2)
    assert r["total"] == sum(range(24))
    assert r["col"] == [84.0, 92.0, 100.0]
