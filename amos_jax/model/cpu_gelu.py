"""The exact (erf) GELU's backward pass in a CPU custom call (`native/gelu.cc`).

`backward(x, g)` is g * GELU'(x) in one pass over x and g, where XLA:CPU evaluates
erf and exp at about half the speed its memory allows and, in the train step, writes
erf's values out for a second pass (BENCHMARKS.md). The forward pass stays XLA's
(one fused pass at memory speed). `resolve_gelu_impl` chooses it
(`model.gelu_impl`); float32 on the CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from amos_jax.config import GELU_IMPLS
from amos_jax.model import native_lib

TARGET = "amos_gelu_bwd"
KERNEL = "amos_gelu"  # its ISA builds (native_lib.isa / use_isa)


def resolve_gelu_impl(implementation: str | None, dtype, platform: str | None = None,
                      mesh=None) -> str:
  """'auto' | 'xla' | 'native' (None: 'auto') -> the one that runs GELU's backward
  pass; dtype: GELU's input's (see `native_lib.resolve`)."""
  return native_lib.resolve("model.gelu_impl", implementation, GELU_IMPLS,
                            what="the native GELU kernel",
                            fallback="XLA's GELU backward pass", dtype=dtype,
                            platform=platform, mesh=mesh)


def backward(x: jax.Array, g: jax.Array) -> jax.Array:
  """g * GELU'(x): float32 x and g of one shape -> that shape."""
  native_lib.load()  # built and registered (RuntimeError saying why not)
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")(x, g.astype(jnp.float32))
