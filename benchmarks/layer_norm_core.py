"""LayerNorm on the CPU, XLA's fused jnp formulas against the custom calls, timed alone.

  python benchmarks/layer_norm_core.py [--batch 32] [--seq 128] [--rounds 60]

`ops.layer_norm(x + residual)` at the widths an ELECTRA-small step normalizes (the
discriminator's 256, the generator's 64), forward and forward plus backward
(jax.vjp, the gradients of x, scale and bias), by `layer_norm_impl` xla and native.
The forms alternate call by call (attention_core._alternating); medians of --rounds
calls, in ms.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rounds", type=int, default=60)
  a = p.parse_args(argv)
  import jax
  from amos_jax.model import ops
  from benchmarks.attention_core import _alternating

  print(f"LayerNorm of x + residual, {jax.devices()[0].device_kind}: ms (median of "
        f"{a.rounds})\n{'shape':>16}  {'pass':>16}  {'xla':>7}  {'native':>7}  ratio")
  for width in (256, 64):
    k = jax.random.split(jax.random.key(0), 5)
    shape = (a.batch, a.seq, width)
    x, residual, g = (jax.random.normal(key, shape) for key in k[:3])
    scale = 1.0 + 0.1 * jax.random.normal(k[3], (width,))
    bias = 0.1 * jax.random.normal(k[4], (width,))
    fns = {}
    for impl in ("xla", "native"):
      def f(x, s, b, impl=impl):
        return ops.layer_norm(x + residual, s, b, 1e-12, impl)
      forward = jax.jit(f)
      both = jax.jit(lambda x, s, b, f=f: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, s, b)))
      fns[("forward", impl)] = (lambda fn: lambda: fn(x, scale, bias))(forward)
      fns[("forward+backward", impl)] = (lambda fn: lambda: fn(x, scale, bias))(both)
    ms = _alternating(fns, a.rounds)
    for pass_ in ("forward", "forward+backward"):
      xla, native = ms[(pass_, "xla")], ms[(pass_, "native")]
      print(f"{str(shape):>16}  {pass_:>16}  {xla:7.3f}  {native:7.3f}  {xla / native:5.2f}x")


if __name__ == "__main__":
  main()
