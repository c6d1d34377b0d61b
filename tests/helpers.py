"""Small configs and batches shared by the tests."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from amos_jax import config as config_lib


def tiny_config(objective: str = "electra", **model):
  c = config_lib.base_config()
  c.model.update(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, embedding_size=16, max_position_embeddings=64,
                 hidden_dropout=0.0, attention_dropout=0.0)
  c.model.update(model)
  c.objective.name = objective
  if objective == "amos":
    # As configs/amos.py: only the token matrix is shared with the generator.
    c.objective.update(rtd_head_layers=1, sampling_temperature=0.3, mixture=True,
                       embedding_sharing="tokens")
    c.objective.generator.update(width_fraction=1.0, tap_layers=(1, 2), dropout=False)
  c.train.update(batch_size=8, seq_len=32, steps=4, warmup_steps=1, log_every=1,
                 eval_every=0)
  return c


def tiny_train_step(objective: str = "electra", **model):
  """(the jitted train step, its state, a 4 x 16 batch) of tiny_config on one device."""
  from amos_jax.objectives import get_objective
  from amos_jax.train import sharding as shd
  from amos_jax.train.state import create_train_state, make_optimizer
  from amos_jax.train.step import make_train_step
  c = tiny_config(objective, **model)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  obj = get_objective(c)
  tx = make_optimizer(c.train)
  graphdef, state, _ = create_train_state(obj, shd.build_mesh(c.mesh, jax.devices()[:1]), tx)
  batch = random_batch(jax.random.key(0), 4, 16, 64)
  return jax.jit(make_train_step(graphdef, obj, tx)), state, batch


def random_batch(rng, batch: int, seq_len: int, vocab: int, pad_tail: int = 0):
  """Random non-special tokens; the last `pad_tail` positions of odd rows are padding."""
  ids = jax.random.randint(rng, (batch, seq_len), 5, vocab)
  seg = jnp.ones((batch, seq_len), jnp.int32)
  if pad_tail:
    odd = (jnp.arange(batch) % 2 == 1)[:, None]
    tail = (jnp.arange(seq_len) >= seq_len - pad_tail)[None, :]
    seg = jnp.where(odd & tail, 0, seg)
    ids = jnp.where(seg == 0, 0, ids)
  return {"input_ids": ids.astype(jnp.int32), "segment_ids": seg}


@contextlib.contextmanager
def fast_compile():
  """XLA's backend optimizations off while inside: the tests' tiny programs compile
  two to three times faster and compute the same values (only the machine code is
  less tuned). A module uses it as an autouse fixture."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def custom_calls_in_step(targets, **model):
  """The tiny ELECTRA train step with scanned layers and dropout on, model keys
  overridden: (how often each FFI target in `targets` is called in its lowered
  program, the metrics of one step)."""
  step, state, batch = tiny_train_step(
      "electra", **{**dict(num_layers=3, hidden_dropout=0.1, attention_dropout=0.1,
                           scan_layers=True), **model})
  text = step.lower(state, batch).as_text()
  _, metrics = step(state, batch)
  return tuple(text.count(f"@{t}(") for t in targets), metrics


def each_isa(kernel: str):
  """Yields each ISA ('avx512', 'avx2', 'generic') whose build of the native kernel
  `kernel` (`native_lib.KERNELS`) this CPU runs, with that build switched in. The
  best one is switched back in after, even on failure, and both the best and the
  generic build must have run."""
  from amos_jax.model import native_lib
  best = native_lib.isa(kernel)
  ran = []
  try:
    for isa in ("avx512", "avx2", "generic"):
      if native_lib.use_isa(kernel, isa):
        ran.append(isa)
        yield isa
  finally:
    assert native_lib.use_isa(kernel, best)
  assert "generic" in ran and best in ran, (best, ran)
