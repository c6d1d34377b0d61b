"""`amos-train --compile_only`: the real AMOS step compiled ahead of time for a TPU pod
named by topology, with the memory per chip reported."""
import re
import subprocess
import sys

import pytest

from amos_jax.train import aot
from tests.train_helpers import ROOT, env_for

_TINY_AMOS = ("--config", f"{ROOT}/configs/amos.py:tiny", "--config.model.num_layers=2",
              "--config.objective.generator.tap_layers=(1,2)",
              "--config.model.vocab_size=512", "--config.train.seq_len=64",
              "--config.train.batch_size=16")


def test_compile_only_for_v5p_2x2x2_reports_memory_per_chip():
  env = env_for()
  env.pop("JAX_PLATFORMS")  # the compile-only TPU client must be allowed to load
  r = subprocess.run([sys.executable, "-m", "amos_jax.cli", *_TINY_AMOS, "--compile_only",
                      "--config.mesh.topology=v5p:2x2x2", "--config.mesh.data=-1",
                      "--config.mesh.fsdp=2"], env=env, capture_output=True, text=True,
                     timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh data=4 x fsdp=2 x tensor=1" in r.stdout
  assert re.search(r"compiled 8 x TPU v5\S* in", r.stdout), r.stdout
  total = re.search(r"total\s+\S+ \S+\s+([\d,]+)", r.stdout)
  assert total and int(total.group(1).replace(",", "")) > 0, r.stdout
  assert "% used, fits" in r.stdout


def test_compile_only_on_fake_cpu_devices():
  r = subprocess.run([sys.executable, "-m", "amos_jax.cli", *_TINY_AMOS, "--compile_only",
                      "--config.mesh.fake_devices=4", "--config.mesh.data=2",
                      "--config.mesh.tensor=2"], env=env_for(1), capture_output=True,
                     text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "compiled 4 x cpu in" in r.stdout and "temporaries" in r.stdout
