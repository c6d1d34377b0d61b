"""Test-wide settings: CPU only (libtpu from the test extra must not probe for a TPU)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
