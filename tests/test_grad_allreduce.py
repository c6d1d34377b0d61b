"""Data-parallel gradients reduced once per step (`sharding.grad_allreduce=once`):
the same step as the partitioner's per-layer reductions, in one all-reduce."""
import json
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from amos_jax.errors import ConfigError
from amos_jax.train.step import reduces_once
from tests.helpers import tiny_config
from tests.train_helpers import ROOT, env_for

_SCRIPT = textwrap.dedent("""
    import json, re
    import jax, numpy as np
    from flax import nnx
    from amos_jax.model.partitioning import axis_rules
    from amos_jax.objectives import get_objective
    from amos_jax.train import sharding as shd
    from amos_jax.train.layer_groups import ungroup
    from amos_jax.train.state import create_train_state, make_optimizer
    from amos_jax.train.step import jit_train_step
    from tests.helpers import random_batch, tiny_config

    def all_reduce_sizes(hlo):
      # Element counts of every array each all-reduce returns (a tuple: several).
      sizes = []
      for line in hlo.splitlines():
        m = re.match(r"\\s*(?:ROOT )?%[\\w.-]+ = (.*?) all-reduce(?:-start)?\\(", line)
        if m:
          sizes.append([int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                        for dims in re.findall(r"\\w+\\[([\\d,]*)\\]", m.group(1))])
      return sizes

    out = {}
    batches = [random_batch(jax.random.key(i), 8, 32, 64, pad_tail=5) for i in range(2)]
    for name, accum in (("electra", 1), ("amos", 2)):
      for mode in ("per_layer", "once"):
        c = tiny_config(name, num_layers=2, hidden_dropout=0.1, attention_dropout=0.1)
        c.train.update(warmup_steps=0, learning_rate=1e-2, grad_accum_steps=accum)
        c.mesh.update(data=2)
        c.sharding.grad_allreduce = mode
        mesh = shd.build_mesh(c.mesh, jax.devices()[:2])
        obj = get_objective(c)
        tx = make_optimizer(c.train)
        graphdef, state, state_sh = create_train_state(obj, mesh, tx)
        batch_sh = shd.batch_sharding(mesh, c.sharding.rules)
        step = jit_train_step(graphdef, obj, tx, state_sh, batch_sh, mesh)
        metrics = []
        with jax.set_mesh(mesh), axis_rules(c.sharding.rules):
          bs = [jax.device_put(b, batch_sh) for b in batches]
          hlo = step.lower(state, bs[0]).compile().as_text()
          for b in bs:
            state, m = step(state, b)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        params = {"/".join(map(str, k)): np.asarray(v[...]).ravel().tolist()
                  for k, v in nnx.to_flat_state(ungroup(state.params))}
        n_params = sum(len(v) for v in params.values())
        out[f"{name}/{accum}/{mode}"] = dict(metrics=metrics, params=params,
                                              n_params=n_params,
                                              all_reduces=all_reduce_sizes(hlo))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs():
  env = dict(env_for(2), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                     text=True, timeout=900, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["electra/1", "amos/2"])
def test_once_trains_as_per_layer(runs, case):
  """Two steps on a data=2 mesh (dropout on; accumulation 1 and 2): the same
  metrics and parameters whichever way the gradients are reduced."""
  a, b = runs[f"{case}/per_layer"], runs[f"{case}/once"]
  assert len({m["loss"] for m in a["metrics"]}) == 2  # the steps do train
  for ma, mb in zip(a["metrics"], b["metrics"]):
    assert set(ma) == set(mb)
    for k in ma:
      assert abs(ma[k] - mb[k]) <= 1e-5 * abs(ma[k]) + 1e-6, (case, k, ma[k], mb[k])
  assert set(a["params"]) == set(b["params"])
  for k, va in a["params"].items():
    diff = max(abs(x - y) for x, y in zip(va, b["params"][k]))
    assert diff <= 1e-5, (case, k, diff)


@pytest.mark.parametrize("case", ["electra/1", "amos/2"])
def test_once_is_one_all_reduce(runs, case):
  """`once` sends every gradient and metric through one flat all-reduce; the
  partitioner's program reduces arrays in several (per layer, inside the scan)."""
  def arrays(run):  # all-reduced arrays of more than one element
    return [n for sizes in run["all_reduces"] for n in sizes if n > 1]
  once, per_layer = runs[f"{case}/once"], runs[f"{case}/per_layer"]
  assert len(arrays(once)) == 1, once["all_reduces"]
  assert arrays(once)[0] >= once["n_params"]
  assert len(arrays(per_layer)) > 1, per_layer["all_reduces"]


class _Sharding:
  def __init__(self, replicated: bool):
    self.is_fully_replicated = replicated


class _Mesh:
  """What `reduces_once` reads of a mesh: size, shape and the devices' platform."""

  def __init__(self, size: int, platform: str = "cpu", fsdp: int = 1):
    self.size = size
    self.shape = {"data": size // fsdp, "fsdp": fsdp, "tensor": 1}
    self.devices = np.array([SimpleNamespace(platform=platform)] * size)


@pytest.mark.parametrize("mode,processes,platform,expected", [
    ("auto", 2, "cpu", True),      # gloo between CPU processes: once
    ("auto", 1, "cpu", False),     # devices of one process: the partitioner's way
    ("auto", 2, "tpu", False),     # accelerators overlap the per-layer reductions
    ("per_layer", 2, "cpu", False),
    ("once", 1, "cpu", True),
    ("once", 1, "tpu", True),
])
def test_when_reduced_once(monkeypatch, mode, processes, platform, expected):
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  c = tiny_config("electra")
  c.sharding.grad_allreduce = mode
  assert reduces_once(c, _Mesh(2, platform), {"w": _Sharding(True)}) is expected
  # One device has nothing to reduce.
  assert not reduces_once(c, _Mesh(1, platform), {"w": _Sharding(True)})


def test_once_needs_replicated_parameters(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  c = tiny_config("electra")
  c.sharding.grad_allreduce = "once"
  with pytest.raises(ConfigError, match=re.escape("set mesh.fsdp=1 and mesh.tensor=1")):
    reduces_once(c, _Mesh(4, fsdp=2), {"w": _Sharding(False)})
  # auto and per_layer leave split parameters to the partitioner.
  for mode in ("auto", "per_layer"):
    c.sharding.grad_allreduce = mode
    assert not reduces_once(c, _Mesh(4, fsdp=2), {"w": _Sharding(False)})


def test_bad_setting_is_one_config_error():
  from amos_jax import config as config_lib
  c = tiny_config("electra")
  c.sharding.grad_allreduce = "sometimes"
  with pytest.raises(ConfigError, match="sharding.grad_allreduce='sometimes': use auto"):
    config_lib.validate(c, 1)
