"""Dropout's masks and attention's core on the CPU, each form timed alone.

  python benchmarks/attention_core.py [--batch 32] [--seq 128] [--heads 4] \
      [--head_dim 64] [--rounds 30]

1. The keep masks of `rng.dropout_keep` with a key per row, XLA's fused hash
   (`dropout_impl=xla`) against the custom call (`native`), at the masks an
   ELECTRA-small step draws: the discriminator's attention and hidden states, the
   generator's (one head, a quarter of the width).
2. `attention.dot_product_attention` with dropout 0.1, forward and forward plus
   backward (jax.vjp), by `attention_impl` xla, gemm and fused.
Each call is jitted and timed after a warm-up; the forms alternate call by call so
that the machine's drift falls on all of them; medians of --rounds calls, in ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _alternating(fns: dict, rounds: int) -> dict:
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main(argv=None):
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--rounds", type=int, default=30)
  a = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from amos_jax.model import rng as rng_lib
  from amos_jax.model.attention import dot_product_attention

  b, t, n, d = a.batch, a.seq, a.heads, a.head_dim
  rows = rng_lib.per_row(jax.random.key(0), jnp.arange(b))
  print(f"dropout masks, a key per row, {jax.devices()[0].device_kind}: ms (median of "
        f"{a.rounds})\n{'shape':>22}  {'xla':>7}  {'native':>7}  ratio")
  for shape in [(b, n, t, t), (b, t, n * d), (b, 1, t, t), (b, t, n * d // 4)]:
    fns = {impl: (lambda f: lambda: f(rows))(jax.jit(
        lambda r, impl=impl, shape=shape: rng_lib.dropout_keep(r, 0.1, shape, impl)[0]))
           for impl in ("xla", "native")}
    ms = _alternating(fns, a.rounds)
    print(f"{str(shape):>22}  {ms['xla']:7.3f}  {ms['native']:7.3f}  "
          f"{ms['xla'] / ms['native']:5.1f}x")

  k = jax.random.split(jax.random.key(1), 4)
  q, kk, v, g = (jax.random.normal(x, (b, t, n, d)) for x in k)
  mask = jnp.ones((b, 1, t, t), bool)

  def core(impl):
    return lambda q, kk, v: dot_product_attention(
        q, kk, v, mask, dropout_rate=0.1, dropout_rng=rows, implementation=impl)

  fns = {}
  for impl in ("xla", "gemm", "fused"):
    forward = jax.jit(core(impl))
    # The output is returned too: a backward pass that does not read it (fused
    # attention's computes the tile again) would let XLA drop the forward call.
    both = jax.jit(lambda q, kk, v, f=core(impl): (lambda out, vjp: (out, vjp(g)))(
        *jax.vjp(f, q, kk, v)))
    fns[f"{impl} forward"] = (lambda f: lambda: f(q, kk, v))(forward)
    fns[f"{impl} forward+backward"] = (lambda f: lambda: f(q, kk, v))(both)
  ms = _alternating(fns, a.rounds)
  print(f"\nattention core ({b}, {t}, {n}, {d}), dropout 0.1: ms (median of {a.rounds})")
  for name, value in ms.items():
    print(f"{name:>24}  {value:7.2f}")


if __name__ == "__main__":
  main()
