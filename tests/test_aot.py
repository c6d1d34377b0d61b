"""Ahead-of-time compiles for a TPU topology and for fake CPU devices."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from amos_jax.errors import ConfigError
from amos_jax.train import aot

# A train-step-like function: a sharded two-layer MLP, its gradient and an SGD update,
# with the parameters donated. Printed as JSON so the test reads it from a subprocess
# (libtpu and the device count must be chosen before JAX starts).
_STEP = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from amos_jax.train import aot

    where = sys.argv[1]
    devices = aot.fake_cpu_devices(8) if where == "cpu" else aot.topology_devices(where)
    mesh = Mesh(np.array(devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    jax.set_mesh(mesh)
    S = lambda *spec: NamedSharding(mesh, P(*spec))
    params = dict(
        w1=jax.ShapeDtypeStruct((512, 2048), jnp.float32, sharding=S("fsdp", "tensor")),
        b1=jax.ShapeDtypeStruct((2048,), jnp.float32, sharding=S()),
        w2=jax.ShapeDtypeStruct((2048, 512), jnp.float32, sharding=S("tensor", "fsdp")))
    x = jax.ShapeDtypeStruct((64, 128, 512), jnp.bfloat16, sharding=S(("data", "fsdp")))

    def step(p, x):
      def loss(p):
        h = jax.nn.gelu(x.astype(jnp.float32) @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"]) ** 2)
      value, grads = jax.value_and_grad(loss)(p)
      return jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads), value

    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    jitted = jax.jit(step, in_shardings=(param_shardings, x.sharding),
                     out_shardings=(param_shardings, S()), donate_argnums=(0,))
    report = aot.compile_and_report(jitted, (params, x))
    shard_bytes = lambda a: int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
    report["expected_param_bytes"] = sum(shard_bytes(a) for a in jax.tree.leaves(params))
    report["expected_batch_bytes"] = shard_bytes(x)
    report["table"] = aot.format_memory_report(report, where)
    print(json.dumps(report))
""")


def _run(code, *args):
  # No XLA_FLAGS: fake_cpu_devices must make the 8 CPU devices itself.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, timeout=300)


def _compile_step(where):
  run = _run(_STEP, where)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def _check(report):
  # w1 and w2 are split 4 ways (fsdp x tensor), b1 is replicated, the batch 4 ways.
  assert report["expected_param_bytes"] == 2 * (512 * 2048 * 4) // 4 + 2048 * 4
  assert report["argument_bytes"] == report["expected_param_bytes"] + report["expected_batch_bytes"]
  # Donated parameters come back in place: each updated shard aliases its input.
  assert report["alias_bytes"] == report["expected_param_bytes"]
  assert report["temp_bytes"] > 0 and report["generated_code_bytes"] >= 0
  assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"]
                                   + report["temp_bytes"] + report["generated_code_bytes"]
                                   - report["alias_bytes"]) > 0
  assert report["devices"] == 8 and report["compile_seconds"] > 0
  assert "total" in report["table"] and f"{report['total_bytes']:,d}" in report["table"]


def test_compile_for_tpu_topology_v5p_2x2x2():
  report = _compile_step("v5p:2x2x2")
  _check(report)
  assert (report["platform"], report["device_kind"]) == ("tpu", "TPU v5")
  assert report["hbm_bytes"] == 95 << 30 and "fits" in report["table"]


def test_bad_topology_name_is_one_clear_line():
  run = _run("from amos_jax.train import aot\n"
             "from amos_jax.errors import AmosError\n"
             "try: aot.topology_devices('v5p:3x3x3')\n"
             "except AmosError as e: print(e)")
  last = run.stdout.strip().splitlines()[-1]
  assert last.startswith("--config.mesh.topology='v5p:3x3x3' is not a tpu topology")


def test_compile_for_fake_cpu_devices():
  report = _compile_step("cpu")
  _check(report)
  assert report["platform"] == "cpu" and report["hbm_bytes"] is None


def test_missing_libtpu_is_one_clear_line(monkeypatch):
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  with pytest.raises(ConfigError) as e:
    aot.topology_devices("v5p:2x2x2")
  assert str(e.value) == ("--config.mesh.topology needs the `libtpu` package: "
                          f"pip install libtpu=={aot.LIBTPU_VERSION}")


def test_libtpu_pin_matches_setup_py():
  setup_py = open(os.path.join(os.path.dirname(__file__), "..", "setup.py")).read()
  assert f'"libtpu=={aot.LIBTPU_VERSION}"' in setup_py
