"""Huge pages for XLA's host buffers: the environment, the one re-execution, the effect."""
import os
import subprocess
import sys

from amos_jax import hostmem

# Prints once per process image: twice when use_huge_pages re-executes, once if not.
_CHILD = """
import ctypes, os, sys
print("start", flush=True)
from amos_jax import hostmem
hostmem.use_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
huge_kb = 0
with open("/proc/self/smaps_rollup") as f:
  for line in f:
    if line.startswith("AnonHugePages:"):
      huge_kb = int(line.split()[1])
print(os.environ.get("GLIBC_TUNABLES", ""), huge_kb, flush=True)
"""


def _child(**env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "AMOS_JAX_HUGE_PAGES")}
  environ.update(env)
  out = subprocess.run([sys.executable, "-c", _CHILD], env=environ, capture_output=True,
                       text=True, check=True).stdout.split("\n")
  starts = out.count("start")
  tunables, huge_kb = out[starts].rsplit(" ", 1)
  return starts, tunables, int(huge_kb)


def test_environment_adds_the_tunable_once_and_respects_the_user():
  env = hostmem.huge_pages_environment({"PATH": "/bin"})
  if env is None:  # this kernel has transparent huge pages off: nothing to turn on
    assert not os.path.exists(hostmem._THP_ENABLED) or "[never]" in open(
        hostmem._THP_ENABLED).read()
    return
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
  kept = hostmem.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # Already set (by the user, or by the re-execution itself): left alone, no loop.
  assert hostmem.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert hostmem.huge_pages_environment({"AMOS_JAX_HUGE_PAGES": "0"}) is None


def test_command_re_executes_once_and_malloc_then_uses_huge_pages():
  if hostmem.huge_pages_environment({}) is None:
    assert _child()[0] == 1  # nothing to turn on: runs once, as it is
    return
  starts, tunables, huge_kb = _child()
  assert starts == 2 and tunables == "glibc.malloc.hugetlb=1"
  assert huge_kb >= 32 << 10, huge_kb  # most of the 64 MiB block sits in 2 MiB pages
  off_starts, off_tunables, off_huge_kb = _child(AMOS_JAX_HUGE_PAGES="0")
  assert (off_starts, off_tunables) == (1, "") and off_huge_kb < huge_kb
