"""Attention's batched products on the CPU in a kernel of our own: `einsum(spec, x, y)`.

XLA:CPU computes a batched dot such as (B, N)-batched 128 x 64 x 128 on one core
(BENCHMARKS.md, seventh stop). `einsum` runs the same product as an XLA FFI custom
call (`native/batched_matmul.cc`) that shares the batch among the intra-op thread
pool's threads. Each thread runs a register-blocked kernel compiled for AVX-512,
AVX2 + FMA or the baseline ISA (the best the CPU has: `isa()`), reading A in place
through its strides and copying B only where it is stored transposed. The heads of
a (B, T, N, Dh) array are strided matrices, so no transposed copy of a whole
operand is made.

The library (`native_lib`) is compiled on first use with the system C++ compiler
against jaxlib's FFI headers and cached. `available()` says whether it loaded, and
`unavailable_reason()` why not.

Specs: two shared batch letters, one contraction letter, two free letters, e.g.
"btnd,bsnd->bnts" (attention logits) or "bnts,bsnd->btnd" (context); any operand
layout with the row or the column unit-strided (row-major arrays always are).
Differentiable (custom VJP: each cotangent is itself such a product); float32 only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from amos_jax.model import native_lib

TARGET = "amos_batched_matmul"


def unavailable_reason() -> str:
  """'' when the kernel can run, else why not (one line)."""
  return native_lib.unavailable_reason()


def available() -> bool:
  return not unavailable_reason()


def isa() -> str:
  """The kernel this CPU runs: 'avx512', 'avx2' or 'generic' ('' if unavailable)."""
  return native_lib.isa(TARGET)


def use_isa(name: str) -> bool:
  """Runs the named compiled kernel from now on (tests compare them); False where it
  is not compiled in or the CPU lacks it."""
  return native_lib.use_isa(TARGET, name)


def _row_major_strides(shape) -> list[int]:
  strides = [1] * len(shape)
  for i in range(len(shape) - 2, -1, -1):
    strides[i] = strides[i + 1] * shape[i + 1]
  return strides


def _parse(spec: str):
  """spec -> (lhs letters, rhs letters, out letters, batch, contracted, rows, cols)."""
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  batch = [c for c in out if c in lhs and c in rhs]
  contracted = [c for c in lhs if c in rhs and c not in out]
  free = [c for c in out if c not in batch]
  if (len(batch) != 2 or len(contracted) != 1 or len(free) != 2 or len(out) != 4
      or sorted(lhs + rhs) != sorted(batch * 2 + contracted * 2 + free)):
    raise ValueError(f"cpu_matmul.einsum({spec!r}): needs two batch letters, one "
                     "contracted letter and one free letter per operand")
  return lhs, rhs, out, batch, contracted[0], free[0], free[1]


def _matrix(strides: dict, rows: str, cols: str):
  """(transposed, leading dimension) of a row-major view rows x cols."""
  if strides[cols] == 1:
    return 0, strides[rows]
  if strides[rows] == 1:
    return 1, strides[cols]
  raise ValueError("cpu_matmul: an operand has neither matrix dimension unit-strided")


def _product(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  if 0 in x.shape or 0 in y.shape:  # nothing for the kernel to do (zeros, or empty)
    return jnp.einsum(spec, x, y)
  lhs, rhs, out, batch, k, m, n = _parse(spec)
  if m not in lhs:  # the output's rows come from y: C = op(y) op(x) in these terms
    x, y, lhs, rhs = y, x, rhs, lhs
  size = {**dict(zip(lhs, x.shape)), **dict(zip(rhs, y.shape))}
  sx = dict(zip(lhs, _row_major_strides(x.shape)))
  sy = dict(zip(rhs, _row_major_strides(y.shape)))
  out_shape = tuple(size[c] for c in out)
  so = dict(zip(out, _row_major_strides(out_shape)))
  if so[n] != 1:
    raise ValueError(f"cpu_matmul.einsum({spec!r}): the output's last letter must be "
                     "its column")
  ta, lda = _matrix(sx, m, k)
  tb, ldb = _matrix(sy, k, n)
  dims = dict(n0=size[batch[0]], n1=size[batch[1]], m=size[m], n=size[n], k=size[k],
              ta=ta, a0=sx[batch[0]], a1=sx[batch[1]], lda=lda,
              tb=tb, b0=sy[batch[0]], b1=sy[batch[1]], ldb=ldb,
              c0=so[batch[0]], c1=so[batch[1]], ldc=so[m])
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(
      x, y, **{key: np.int64(v) for key, v in dims.items()})


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """jnp.einsum(spec, x, y) for float32 x, y on the CPU, in the kernel (see module)."""
  if x.dtype != jnp.float32 or y.dtype != jnp.float32:
    raise TypeError(f"cpu_matmul.einsum takes float32, not {x.dtype} and {y.dtype}")
  if not available():
    raise RuntimeError(f"cpu_matmul is unavailable: {unavailable_reason()}")
  return _product(spec, x, y)


def _einsum_fwd(spec, x, y):
  return einsum(spec, x, y), (x, y)


def _einsum_bwd(spec, residuals, g):
  x, y = residuals
  lhs, rhs, out, *_ = _parse(spec)
  # d/dx einsum(lhs,rhs->out) = einsum(out,rhs->lhs); d/dy = einsum(lhs,out->rhs).
  return (_product(f"{out},{rhs}->{lhs}", g, y),
          _product(f"{lhs},{out}->{rhs}", x, g))


einsum.defvjp(_einsum_fwd, _einsum_bwd)
