"""Test-wide settings: CPU only (libtpu from the test extra must not probe for a TPU),
several processes may load libtpu's compile-only client at once (its lockfile
otherwise lets only one process per machine use it), and XLA's backend
optimizations off (`jax_disable_most_optimizations`, inherited by the trainer
subprocesses): the tests' small programs compile two to three times faster and
compute the same values; only the machine code is less tuned. One CPU device per
process unless a test asks for more (AMOS_JAX_CPU_DEVICES, amos_jax/hostcpu.py):
the trainer subprocesses then run as on a one-core host wherever the suite runs,
and tests/test_hostcpu.py checks the split itself."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("AMOS_JAX_CPU_DEVICES", "1")
