"""Where attention-probability dropout's cost goes: the random bits, or the explicit
(unfused) softmax path it forces. Forward + backward of one attention block at
ELECTRA-small's discriminator shapes, variants alternated in one process.

  python benchmarks/bench_attention_dropout.py --batch 32 --seq 128 --rounds 7

Variants: fused `jax.nn.dot_product_attention` without dropout; the explicit path
without dropout (mask of ones: the unfused softmax alone); the explicit path with
per-row masks from a float32 uniform per element (`jax.random.bernoulli`, what the
step drew before) and from 16-bit integer thresholds (`rng.dropout_keep`, what it
draws now), by threefry, rbg and unsafe_rbg keys.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--reps", type=int, default=5, help="calls per timed window")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from amos_jax.model import rng as rng_lib
  from amos_jax.model.attention import dot_product_attention, segment_attention_mask

  b, t, n, d = args.batch, args.seq, args.heads, args.head_dim
  k0 = jax.random.key(0)
  q, k, v = (jax.random.normal(jax.random.fold_in(k0, i), (b, t, n, d)) for i in range(3))
  mask = segment_attention_mask(jnp.ones((b, t), jnp.int32))
  rows = jnp.arange(b)

  def variant(rate, impl, float_uniform=False):
    def loss(q, k, v, step):
      rng = None
      if impl:
        key = jax.random.fold_in(jax.random.key(1, impl=impl), step)
        rng = rng_lib.per_row(key, rows)
      if float_uniform:
        return jnp.sum(_explicit(q, k, v, mask, rng) ** 2)
      if rate and not impl:  # the explicit path with a mask of ones: no random bits
        return jnp.sum(_explicit(q, k, v, mask, None) ** 2)
      return jnp.sum(dot_product_attention(q, k, v, mask, dropout_rate=rate,
                                           dropout_rng=rng, implementation="xla") ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  def _explicit(q, k, v, mask, rng):
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1) / 0.9
    if rng is not None:
      keep = rng_lib.draw(lambda key, s: jax.random.bernoulli(key, 0.9, s), rng,
                          probs.shape)
      probs = jnp.where(keep, probs, 0.0)
    return jnp.einsum("bnts,bsnd->btnd", probs, v)

  variants = {"fused, no dropout": variant(0.0, None),
              "explicit softmax, no bits": variant(0.1, None),
              "threefry, float uniform": variant(0.1, "threefry2x32", True),
              "threefry, 16-bit": variant(0.1, "threefry2x32"),
              "rbg, float uniform": variant(0.1, "rbg", True),
              "rbg, 16-bit": variant(0.1, "rbg"),
              "unsafe_rbg, 16-bit": variant(0.1, "unsafe_rbg")}
  for f in variants.values():
    jax.block_until_ready(f(q, k, v, 0))
  times = {name: [] for name in variants}
  for r in range(args.rounds):
    for name, f in variants.items():
      start = time.perf_counter()
      for i in range(args.reps):
        out = f(q, k, v, r * args.reps + i)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / args.reps * 1e3)
  base = float(np.median(times["fused, no dropout"]))
  result = {}
  for name, ts in times.items():
    med = float(np.median(ts))
    result[name] = {"median_ms": med, "min_ms": float(min(ts)), "max_ms": float(max(ts)),
                    "vs_fused": med / base}
    print(f"{name:<28} {med:8.2f} ms  (min {min(ts):.2f}, max {max(ts):.2f})  "
          f"{med / base:.2f}x")
  print(json.dumps({"shape": [b, t, n, d], "rounds": args.rounds, **result}))
  return result


if __name__ == "__main__":
  from amos_jax import hostmem
  hostmem.use_huge_pages()  # as the amos-* commands run (amos_jax/hostmem.py)
  main()
