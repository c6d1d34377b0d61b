"""Every shipped config builds its model and runs one train step.

Widths, depths, vocabulary, sequence length and batch are cut to tiny values; the
objective settings (masking, generator fraction and taps, sharing, mixture, loss
weights) and the optimizer settings stay the config's own, so a config whose
objective or optimizer section cannot work fails here, in process.

Compile time is most of the cost: the step is compiled with XLA's backend
optimizations off (the program is the same; only its machine code is less tuned),
and configs that are identical once reduced share one compiled step.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amos_jax import config as config_lib
from amos_jax.objectives import get_objective
from amos_jax.train.state import TrainState, make_optimizer, stack_state
from amos_jax.train.step import make_train_step
from tests.helpers import fast_compile, random_batch
from tests.train_helpers import ROOT

# Every size: tiny and small share base and large's objective settings but not their
# optimizer and schedule (a config whose learning rate or betas cannot train fails).
CONFIGS = [f"{name}.py:{size}" for name in ("amos", "electra", "mlm")
           for size in ("tiny", "small", "base", "large")]
CONFIGS += ["continue.py:electra", "continue.py:amos", "demo.py"]

_TINY_MODEL = dict(hidden_size=16, num_heads=2, intermediate_size=32, embedding_size=16,
                   num_layers=1, vocab_size=64, max_position_embeddings=32,
                   relative_attention_buckets=0)
_compiled = {}  # reduced config (JSON) -> jitted train step


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  with fast_compile():
    yield


def reduced(spec: str):
  """The config of `spec` at a tiny width; everything else as the file sets it."""
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", spec))
  c.model.update(_TINY_MODEL)
  c.init_from = ""  # a checkpoint of the full width cannot fill the tiny model
  c.train.update(batch_size=4, seq_len=32, grad_accum_steps=1)
  c.mesh.update(data=1, fsdp=1, tensor=1, topology="", fake_devices=0)
  return config_lib.freeze(c)


def test_reduction_keeps_each_configs_own_settings():
  """What the step below runs differs from the file only in sizes."""
  full = config_lib.load_config_file(os.path.join(ROOT, "configs", "amos.py:base"))
  small = reduced("amos.py:base")
  assert small.objective.to_dict() == full.objective.to_dict()
  for key in ("learning_rate", "b1", "b2", "eps", "clip_norm", "warmup_steps", "steps",
              "weight_decay", "schedule"):
    assert small.train[key] == full.train[key], key
  assert reduced("continue.py:amos").objective.generator.tap_layers == (2, 4, 6)


@pytest.mark.parametrize("spec", CONFIGS)
def test_config_builds_and_takes_one_train_step(spec):
  config = reduced(spec)
  config_lib.validate(config, 1)
  objective = get_objective(config)
  tx = make_optimizer(config.train)
  graphdef, params = nnx.split(objective.build_model(nnx.Rngs(config.train.seed)),
                               nnx.Param)
  # The step at the end of warm-up: the config's peak learning rate.
  peak_step = config_lib.warmup_steps(config.train)
  state = stack_state(TrainState(
      step=jnp.asarray(peak_step, jnp.int32), params=params, opt_state=tx.init(params),
      nonfinite_streak=jnp.zeros((), jnp.int32)))
  batch = random_batch(jax.random.key(0), 4, 32, 64, pad_tail=4)
  key = json.dumps(config.to_dict(), sort_keys=True, default=str)
  if key not in _compiled:
    _compiled[key] = jax.jit(make_train_step(graphdef, objective, tx))
  new_state, metrics = _compiled[key](state, batch)
  metrics = jax.device_get(metrics)
  assert int(new_state.step) == peak_step + 1
  assert float(metrics["skipped"]) == 0.0
  assert all(math.isfinite(float(v)) for v in metrics.values()), metrics
  assert float(metrics["grad_norm"]) > 0
  assert float(metrics["learning_rate"]) == pytest.approx(config.train.learning_rate)
  new = jax.tree.leaves(new_state.params)
  assert all(bool(jnp.isfinite(x).all()) for x in new)
  assert max(float(np.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(state.params), new)) > 0
