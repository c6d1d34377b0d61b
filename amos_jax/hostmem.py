"""Transparent huge pages for the host memory XLA's CPU backend works in.

XLA's CPU runtime takes its activation and temporary buffers from the C library's
malloc. A train step touches gigabytes of them (about 466,000 fresh 4 KiB pages per
ELECTRA-small step at batch 32 x 128), and with 4 KiB pages it loses a measurable
part of its time to TLB misses. glibc (2.35 and later) can back the memory it maps
with transparent huge pages (2 MiB), but only if told so when the process starts
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): the step then runs about 10% faster
(BENCHMARKS.md, "lean backward passes, huge pages, unrolled embedding"). The
command-line tools call `use_huge_pages()` first thing, which re-executes the same
command once with the tunable added to the environment. `AMOS_JAX_HUGE_PAGES=0` turns this off; an
explicit `glibc.malloc.hugetlb` setting in GLIBC_TUNABLES is left as it is.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_environment(environ=None) -> dict | None:
  """The environment to re-execute with, or None where there is nothing to do.

  Nothing to do: opted out (AMOS_JAX_HUGE_PAGES=0), GLIBC_TUNABLES already sets
  the tunable (also how the re-executed process knows it is done), not Linux with
  glibc, or transparent huge pages switched off in the kernel.
  """
  environ = dict(os.environ if environ is None else environ)
  if environ.get("AMOS_JAX_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return None
  try:
    with open(_THP_ENABLED) as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)
  return environ


def use_huge_pages() -> None:
  """Re-executes this command (sys.orig_argv) with huge pages on; returns if not needed.

  Call only from a command's entry point, before any work: the process image is
  replaced, so nothing done before the call survives.
  """
  environ = huge_pages_environment()
  argv = getattr(sys, "orig_argv", None)
  if environ is None or not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(argv[1:]), environ)
