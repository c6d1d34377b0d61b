"""Exact search sharded over 8 fake CPU devices returns NumPy's top-k ids and scores,
for corpora that divide evenly over neither the devices nor the chunks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from train_helpers import ROOT, env_for

SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  from amos_jax.eval import search
  assert jax.device_count() == 8, jax.devices()

  def reference(q, c, k, exclude=None):
    s = q.astype(np.float64) @ c.astype(np.float64).T
    if exclude is not None:
      for i, e in enumerate(exclude):
        if e >= 0:
          s[i, e] = -np.inf
    # Best score first; equal scores: the lower corpus row first.
    order = np.stack([np.lexsort((np.arange(len(c)), -row))[:k] for row in s])
    return np.take_along_axis(s, order, 1), order

  rng = np.random.default_rng(0)
  # Gaussian vectors; 1003 rows over 8 devices and 96-row chunks (neither divides).
  c = rng.normal(size=(1003, 24)).astype(np.float32)
  q = rng.normal(size=(37, 24)).astype(np.float32)
  s, i = search.exact_search(q, c, 10, chunk_rows=96, query_block=16)
  rs, ri = reference(q, c, 10)
  assert (i == ri).all()
  np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)

  # Small integers: exact products and many ties, broken by the lower row; an
  # excluded row per query; k larger than one device's share of a chunk.
  c = rng.integers(-1, 2, size=(203, 6)).astype(np.float32)
  q = rng.integers(-1, 2, size=(11, 6)).astype(np.float32)
  exclude = np.where(np.arange(11) % 2 == 0, rng.integers(0, 203, 11), -1)
  s, i = search.exact_search(q, c, 25, exclude=exclude, chunk_rows=40, query_block=4)
  rs, ri = reference(q, c, 25, exclude)
  assert (i == ri).all(), (i[:2], ri[:2])
  assert (s == rs).all()

  # k beyond the corpus: every row once, then empty slots (-inf, row -1).
  s, i = search.exact_search(q[:2], c[:5], 7, exclude=np.array([4, -1]))
  assert i.shape == (2, 5) and sorted(i[1]) == [0, 1, 2, 3, 4]
  assert i[0, -1] == -1 and s[0, -1] == -np.inf and 4 not in i[0]

  # `prepare` maps stored rows (e.g. truncate + normalize) chunk by chunk.
  wide = rng.normal(size=(300, 16)).astype(np.float32)
  prep = lambda r: r[:, :8] / np.linalg.norm(r[:, :8], axis=1, keepdims=True)
  s, i = search.exact_search(prep(wide[:5]), wide, 3, prepare=prep, chunk_rows=64)
  assert (i[:, 0] == np.arange(5)).all()
  np.testing.assert_allclose(s[:, 0], 1.0, rtol=1e-5)

  # Device memory does not grow with the corpus: the same compiled step serves
  # every corpus size, one chunk on the devices at a time.
  search._merge_step.cache_clear()
  for n in (500, 5000):
    search.exact_search(q[:3].repeat(4, 1)[:, :16], rng.normal(size=(n, 16)), 5,
                        chunk_rows=256, query_block=8)
  assert search._merge_step.cache_info().misses == 1
  print("OK")
""")


def test_sharded_exact_search_equals_numpy():
  r = subprocess.run([sys.executable, "-c", SCRIPT], env=env_for(8), capture_output=True,
                     text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
