"""Test-wide settings: CPU only (libtpu from the test extra must not probe for a TPU),
and several processes may load libtpu's compile-only client at once (its lockfile
otherwise lets only one process per machine use it)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
