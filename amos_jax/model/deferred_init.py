"""Parameter initialization with one random draw per layer-stacked parameter.

Built inside `jit`, a model draws each parameter on its own: `nnx.Linear` calls its
initializer with a key from `rngs.params()` once per layer, so a 12-layer encoder
pair traces about 150 random draws and XLA compiles each into its own kernel. On
the CPU that alone took 10 s of ELECTRA-small's start, growing with depth, while the
same draws batched over the layers compile in a fraction of a second.

`plan_params` builds the model once on the host with every `with_logical_axes`
initializer deferred: it records the key nnx hands it, and the parameter holds a
`ShapeDtypeStruct` stand-in. Grouped by layer (`layer_groups.group` with
`stack_draws`), each layer-stacked parameter is then drawn inside the caller's jit
(`value_of`) as one `vmap` of its initializer over its layers' keys. The keys are
the ones the plain construction uses, and a vmapped draw gives each key the bits it
gives alone, so the parameters equal the plain `build_model(nnx.Rngs(seed))`
construction's bit for bit (tests/test_deferred_init.py). Layers drawn alike must
share one initializer function (`encoder.normal_init`); others are drawn one by one.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True, eq=False)
class Draw:
  """A deferred initializer call `init(key, shape, dtype)`, its key held on the host
  (`key_data`: numpy, so the program embeds it whatever the devices and processes).
  For a layer-stacked parameter `layers` is L and `key_data` holds the layers' keys."""
  init: Callable
  key_data: np.ndarray
  key_impl: Any            # the key's PRNG implementation; None for a raw uint32 key
  shape: tuple[int, ...]
  dtype: Any
  layers: int | None = None

  def value(self) -> jax.Array:
    """The parameter, or the (L, ...) stack of the layers' parameters."""
    key = (self.key_data if self.key_impl is None else
           jax.random.wrap_key_data(self.key_data, impl=self.key_impl))
    if self.layers is None:
      return self.init(key, self.shape, self.dtype)
    return jax.vmap(lambda k: self.init(k, self.shape, self.dtype))(key)


def _draw(init, key, shape, dtype) -> Draw:
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  data = np.asarray(jax.random.key_data(key) if typed else key)
  return Draw(init, data, jax.random.key_impl(key) if typed else None,
              tuple(shape), jnp.dtype(dtype))


_RECORDING: contextvars.ContextVar[dict[int, tuple[jax.ShapeDtypeStruct, Draw]] | None] = (
    contextvars.ContextVar("amos_jax_deferred_draws", default=None))


def deferrable(init: Callable) -> Callable:
  """`init(key, shape, dtype)` that, while `plan_params` records, records the call
  and returns a stand-in instead of drawing."""

  def call(key, shape, dtype=jnp.float32):
    draws = _RECORDING.get()
    if draws is None:
      return init(key, shape, dtype)
    stand_in = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    # Keyed by identity: the stand-in is the leaf nnx.split hands back.
    draws[id(stand_in)] = (stand_in, _draw(init, key, shape, dtype))
    return stand_in

  return call


@contextlib.contextmanager
def _recording():
  draws: dict[int, tuple[jax.ShapeDtypeStruct, Draw]] = {}
  token = _RECORDING.set(draws)
  try:
    yield draws
  finally:
    _RECORDING.reset(token)


def plan_params(build: Callable[[nnx.Rngs], nnx.Module], seed: int):
  """Builds the model on the host with its initializers deferred.

  Returns (graphdef, plan): plan is the model's parameter tree (an nnx.State, its
  Variables' metadata kept) with each leaf a `Draw`, or a numpy array for a
  parameter whose initializer was not deferred. Nothing parameter-sized is
  allocated for the deferred ones.
  """
  with _recording() as draws:
    model = build(nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)

  def leaf(x):
    stand_in, draw = draws.get(id(x), (None, None))
    return draw if stand_in is x else np.asarray(x)

  return graphdef, jax.tree.map(leaf, params)


def stack_draws(leaves: list):
  """One parameter's per-layer plan leaves -> one Draw of the (L, ...) stack; or
  the list as it is where the layers were not drawn alike (each is drawn, then
  stacked). The `stack` argument of `layer_groups.group`."""
  first = leaves[0]
  if all(isinstance(d, Draw) and (d.init, d.key_impl, d.shape, d.dtype) ==
         (first.init, first.key_impl, first.shape, first.dtype) for d in leaves):
    return dataclasses.replace(first, key_data=np.stack([d.key_data for d in leaves]),
                               layers=len(leaves))
  return list(leaves)


def value_of(leaf) -> jax.Array:
  """The parameter a plan leaf stands for (call under jit, with its out_shardings)."""
  if isinstance(leaf, list):
    return jnp.stack([value_of(x) for x in leaf])
  if isinstance(leaf, Draw):
    return leaf.value()
  return jnp.asarray(leaf)
