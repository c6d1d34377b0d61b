"""LayerNorm in two CPU custom calls (`native/layer_norm.cc`): `layer_norm(x, scale,
bias, eps)`, differentiable.

The forward call computes each row's statistics and output in one pass and keeps
the statistics ((R, 2) for its R rows: mean, 1/std); the backward call gives (dx,
dscale, dbias) in one pass over the rows. XLA:CPU runs the statistics as separate
reductions and dscale and dbias as reductions over the rows, which took about two
thirds of a (4096, 256) LayerNorm's forward and backward time (BENCHMARKS.md).
`resolve_layer_norm_impl` chooses it (`model.layer_norm_impl`); float32 on the CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from amos_jax.config import LAYER_NORM_IMPLS
from amos_jax.model import native_lib

FORWARD, BACKWARD = "amos_layer_norm_fwd", "amos_layer_norm_bwd"
KERNEL = "amos_layer_norm"  # its ISA builds (native_lib.isa / use_isa)


def resolve_layer_norm_impl(implementation: str | None, dtype, platform: str | None = None,
                            mesh=None) -> str:
  """'auto' | 'xla' | 'native' (None: 'auto') -> the one that runs LayerNorm; dtype:
  its input's and output's (see `native_lib.resolve`)."""
  return native_lib.resolve("model.layer_norm_impl", implementation, LAYER_NORM_IMPLS,
                            what="the native LayerNorm kernel", fallback="XLA's LayerNorm",
                            dtype=dtype, platform=platform, mesh=mesh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis, float32: (..., H), scale (H,), bias (H,) -> (..., H)."""
  return _forward(x, scale, bias, eps)[0]


def _forward(x, scale, bias, eps):
  """y (..., H) and the statistics (R, 2) of x's R rows."""
  native_lib.load()  # built and registered (RuntimeError saying why not)
  h = x.shape[-1]
  x2 = x.reshape(-1, h)
  y, stats = jax.ffi.ffi_call(
      FORWARD, (jax.ShapeDtypeStruct(x2.shape, jnp.float32),
                jax.ShapeDtypeStruct((x2.shape[0], 2), jnp.float32)),
      vmap_method="sequential")(x2, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                eps=np.float32(eps))
  return y.reshape(x.shape), stats


def _layer_norm_fwd(x, scale, bias, eps):
  y, stats = _forward(x, scale, bias, eps)
  return y, (x, stats, scale, bias)


def _layer_norm_bwd(eps, residuals, g):
  x, stats, scale, bias = residuals
  h = x.shape[-1]
  dx, dscale, dbias = jax.ffi.ffi_call(
      BACKWARD, (jax.ShapeDtypeStruct((stats.shape[0], h), jnp.float32),
                 jax.ShapeDtypeStruct((h,), jnp.float32),
                 jax.ShapeDtypeStruct((h,), jnp.float32)),
      vmap_method="sequential")(x.reshape(-1, h), stats, scale.astype(jnp.float32),
                                g.astype(jnp.float32).reshape(-1, h))
  return (dx.reshape(x.shape), dscale.astype(scale.dtype), dbias.astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
