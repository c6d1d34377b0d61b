"""One JAX device, or one process, per CPU core, on a host that runs JAX on its CPU.

XLA's CPU backend runs a batched matrix product, such as attention's scores QK^T
and context PV over (batch, heads), on one core: it loops over the batch calling a
small matrix kernel that stays on one thread. JAX gives a CPU host one device. Split
into one device per core, with the batch split over them as the data axis, each
device runs its share of those products on its own core, while the large products
still use every core of the shared thread pool. On a 2-core host (BENCHMARKS.md,
"one device per core"), all-MiniLM-L6-v2 embedding takes 0.83-0.92 of its
one-device time, with identical embeddings. Training gains less and not always
(the ELECTRA-small step 0.91-1.02 of its one-device time, AMOS-small 1.07-1.14),
and compiles 2-3 s longer, so training splits only when asked.

The command-line tools call `split_host` before JAX starts its CPU client:

- `AMOS_JAX_CPU_DEVICES` unset or `auto`: amos-eval (sts, retrieval, grid) and
  amos-index embed on one device per core this process may run on; amos-train,
  amos-bench and amos-eval glue keep one device.
- `AMOS_JAX_CPU_DEVICES=N`: N devices for every command (`1`: JAX's default). A
  train run splits its batch over them, so N must divide the micro-batch (the
  trainer's config check names the fix); multi-process runs keep theirs as is.
- A device count the user already gave JAX (`--xla_force_host_platform_device_count`
  in XLA_FLAGS, or JAX_NUM_CPU_DEVICES) is left as it is.

Devices of one process share one thread pool, and XLA splits every kernel over it.
`AMOS_JAX_CPU_PROCESSES=N` (or `auto`: one per core) runs amos-train instead as N
data-parallel processes, each on its own block of cores (`run_processes`), joined
by `jax.distributed` on localhost; their gradients cross in one flat all-reduce per
step (`sharding.grad_allreduce`, train/step.py). Process 0 compiles each program
for all of them (`share_compiles`). The ELECTRA-small step takes about 0.9 of its
one-process time that way (BENCHMARKS.md); the program with the all-reduce takes
longer to compile than one process's, so short runs gain nothing.

On a host with an accelerator the setting changes nothing the run uses: it sizes
only the CPU client, and the mesh is built over the accelerator's devices.
"""
from __future__ import annotations

import logging
import os

from amos_jax.errors import ConfigError

ENV = "AMOS_JAX_CPU_DEVICES"
log = logging.getLogger(__name__)


def _env_count(environ, name: str, noun: str, one: str) -> int | None:
  """The positive count the environment variable `name` holds; None for `auto` or
  unset. Anything else is one ConfigError naming the variable and the fix."""
  value = environ.get(name, "").strip().lower()
  if value in ("", "auto"):
    return None
  try:
    count = int(value)
  except ValueError:
    count = 0
  if count < 1:
    raise ConfigError(f"{name}={environ.get(name)!r} is not a {noun} count; set it to a "
                      f"positive integer (1: {one}) or to auto (one per core)")
  return count


def requested_devices(environ=None) -> int | None:
  """The count AMOS_JAX_CPU_DEVICES asks for; None for `auto` (or unset)."""
  return _env_count(os.environ if environ is None else environ, ENV, "device",
                    "one CPU device")


def host_cores() -> int:
  """The cores this process may run on (its CPU affinity, as taskset sets it)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def device_count_was_given(environ=None) -> bool:
  """True where the user sized JAX's CPU client already (XLA_FLAGS or JAX's env)."""
  environ = os.environ if environ is None else environ
  return ("xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "")
          or bool(environ.get("JAX_NUM_CPU_DEVICES", "").strip()))


def split_host(auto_count: int | None = None) -> int:
  """Sizes JAX's CPU client before it starts; returns the device count set, or 0
  where it left JAX alone (a count given by the user, one device, or a client that
  has started already: sizing it is only possible before that).

  auto_count: the count for `auto` (default: one per core; training passes 1).
  """
  count = requested_devices()
  if count is None:
    if device_count_was_given():
      return 0
    count = host_cores() if auto_count is None else auto_count
  return count if count > 1 and size_cpu_client(count) else 0


def size_cpu_client(count: int) -> bool:
  """Asks JAX's CPU client for `count` devices (at least as many as asked before);
  False where the client has started and can no longer be sized."""
  import jax
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return False
  jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
  return True


# ------------------------------------------------- one process per core (training)
PROCESSES_ENV = "AMOS_JAX_CPU_PROCESSES"


def requested_processes(environ=None) -> int:
  """The process count AMOS_JAX_CPU_PROCESSES asks amos-train for (unset: 1; `auto`:
  one per core this process may run on)."""
  environ = os.environ if environ is None else environ
  count = _env_count(environ, PROCESSES_ENV, "process", "one process")
  if count is None:
    return host_cores() if environ.get(PROCESSES_ENV, "").strip().lower() == "auto" else 1
  return count


def core_blocks(count: int, cores: list[int] | None = None) -> list[set[int]]:
  """`count` disjoint, contiguous blocks of this process's cores, as even as they go."""
  cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
  if count > len(cores):
    raise ConfigError(f"{PROCESSES_ENV}={count} exceeds the {len(cores)} cores this "
                      f"process may run on; use at most {len(cores)}")
  n = len(cores)
  return [set(cores[i * n // count:(i + 1) * n // count]) for i in range(count)]


def processes_to_start() -> int:
  """The processes a command should start itself (`run_processes`): the count
  AMOS_JAX_CPU_PROCESSES asks for, or 1 where this process is already one of a
  launched run (a child of `run_processes`, SLURM, Open MPI, a coordinator given)."""
  from amos_jax.train.distributed import detect_process_count
  count = requested_processes()
  return count if count > 1 and detect_process_count() == 1 else 1


def start_processes(count: int, command: list[str], environ=None, **popen) -> list:
  """Starts `command` as processes 0..count-1 of one run on this host, told where
  to join with `jax.distributed` on localhost (gloo collectives;
  amos_jax/train/distributed.py). Returns the Popens.

  Each process runs on its block of cores (`core_blocks`), XLA's thread pool sized
  to it. Processes 1.. are pinned to their blocks before Python starts. Process 0
  compiles the programs for all of them while they wait (`share_compiles`), so it
  starts free to compile on every core, NPROC sizing its thread pool to its block,
  and pins itself there once its step is compiled (`settle_on_cores`)."""
  import socket
  import subprocess
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = {k: v for k, v in (os.environ if environ is None else environ).items()
         if k != PROCESSES_ENV}
  env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(count),
             JAX_PLATFORMS=env.get("JAX_PLATFORMS") or "cpu", **{ONE_HOST_ENV: "1"})
  blocks = core_blocks(count)
  return [subprocess.Popen(
      command,
      env=dict(env, JAX_PROCESS_ID=str(i),
               **({"NPROC": str(len(block)), CORES_ENV: ",".join(map(str, sorted(block)))}
                  if i == 0 else {})),
      preexec_fn=None if i == 0 else (lambda block=block: os.sched_setaffinity(0, block)),
      **popen) for i, block in enumerate(blocks)]


def run_config_processes(count: int, command: list[str], config) -> int:
  """`run_processes` for a command that runs `config`, checked first against the
  run's devices (one per process): a bad config is one error line here, not one
  from every process."""
  from amos_jax import config as config_lib
  config_lib.validate(config, count)
  return run_processes(count, command)


def run_processes(count: int, command: list[str]) -> int:
  """Runs `command` as `count` processes of one data-parallel run on this host
  (`start_processes`) and waits for them.

  Why: at ELECTRA-small's sizes a kernel split over two cores runs well below twice
  its one-core speed, so two single-core processes, each with half the batch, step
  faster than one process on both cores (BENCHMARKS.md, "one process per core").
  SIGTERM and SIGINT are passed on (each process saves at its next step and
  exits); when one process fails the others are stopped. Returns the first
  failure's exit status, else 0.
  """
  import signal
  import time
  procs = start_processes(count, command)

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    status, failed_at = 0, None
    while True:
      alive = [p.poll() is None for p in procs]  # a list: poll every process
      failed = [p.returncode for p in procs if p.returncode]
      if failed and failed_at is None:
        # A failed process leaves its peers waiting in a collective: stop them,
        # and kill what has not stopped 10 s later.
        status, failed_at = failed[0], time.monotonic()
        forward(signal.SIGTERM, None)
      elif failed_at is not None and time.monotonic() - failed_at > 10:
        for p in procs:
          if p.poll() is None:
            p.kill()
      if not any(alive):
        break
      time.sleep(0.2)
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


# --------------------------------------- one compile for all processes of the host
ONE_HOST_ENV = "AMOS_JAX_PROCESSES_ON_ONE_HOST"   # set by `start_processes`
CORES_ENV = "AMOS_JAX_PROCESS_CORES"   # process 0's block, till `settle_on_cores`


def settle_on_cores() -> None:
  """Pins every thread of process 0 of `start_processes` to its block of cores, as
  the other processes are from their start. Process 0 runs on every core until
  then, to compile for all (`share_compiles`): call once the step is compiled.
  Does nothing in any other process, or the second time."""
  cores = os.environ.pop(CORES_ENV, "")
  if not cores:
    return
  block = {int(c) for c in cores.split(",")}
  try:
    threads = [int(t) for t in os.listdir("/proc/self/task")]
  except OSError:
    threads = [0]
  for thread in threads:
    try:
      os.sched_setaffinity(thread, block)
    except OSError:  # a thread that has ended since
      pass


def share_compiles() -> bool:
  """In a process of `run_processes`, lets process 0 compile every program the
  processes run together and hand the executable to the others, instead of each
  compiling it on its own block of cores; returns True where it is set up.

  JAX has the mechanism (`jax_share_binary_between_hosts`: process 0 compiles and
  publishes the executable under its persistent-cache key, the others wait for that
  key), but on CPU every process computes another key: the key hashes the CPU
  client's topology, whose description differs from process to process. Here all
  processes run on one host, so the same executable is right for each of them, and
  the topology's part of the key is replaced by what they share: the devices (ids,
  process indices, kind) and this host's CPU (its model and instruction-set flags,
  so a cache directory shared between machines still keeps their programs apart).
  With equal keys the persistent compilation cache, where one is set, also serves
  every process, not only process 0. (JAX computes the key, and so shares, unless
  `jax_enable_compilation_cache` is off.)

  `train.distributed.maybe_initialize_distributed` calls it once the processes
  have joined, before the first compile; a second call changes nothing. Nothing is
  changed outside a run of `run_processes` or off the CPU backend.
  """
  import jax
  if os.environ.get(ONE_HOST_ENV) != "1" or jax.process_count() == 1:
    return False
  if jax.default_backend() != "cpu":
    return False
  from jax._src import cache_key
  hash_devices = getattr(cache_key, "_hash_accelerator_config", None)
  if getattr(hash_devices, "one_host", False):
    return True   # set up already
  if not callable(hash_devices):
    log.warning("this JAX has no cache_key._hash_accelerator_config: every process "
                "compiles its own programs")
    return False
  host = _host_cpu().encode()

  def hash_one_host_devices(hash_obj, devices):
    hash_obj.update(host)
    for d in devices.flat:
      hash_obj.update(f"{d.platform}/{d.device_kind}/{d.id}/{d.process_index};".encode())

  hash_one_host_devices.one_host = True
  cache_key._hash_accelerator_config = hash_one_host_devices
  jax.config.update("jax_share_binary_between_hosts", True)
  log.info("process 0 compiles for all %d processes on this host "
           "(hostcpu.share_compiles)", jax.process_count())
  return True


def _host_cpu() -> str:
  """This host's CPU model and instruction-set flags, as /proc/cpuinfo gives them."""
  import platform
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = f.read().split("\n\n")[0].splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  fields = dict(line.split(":", 1) for line in lines if ":" in line)
  return "|".join(fields.get(k, "").strip() for k in
                  ("vendor_id", "model name", "flags", "Features", "CPU part"))
