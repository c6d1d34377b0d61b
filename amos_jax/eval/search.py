"""Exact top-k search: a JAX matmul over the corpus matrix, rows sharded over devices.

The corpus is streamed from host memory (an array or a `np.memmap` on disk) in
fixed-size chunks; each chunk is split by rows over every device (NamedSharding on
a 1-D mesh), each device keeps its own top k, and a running top-k merge folds the
chunk into the best-so-far. Device memory holds one chunk, the queries and the
(Q, k) running result, whatever the corpus size; one program is compiled.

Ties are broken by corpus row: among equal scores the lower row ranks first
(`lax.top_k` keeps the lower position first, the running result always precedes the
chunk, and device d's rows precede device d+1's). Callers that sort the corpus by
document id therefore break ties by id.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ROWS = "rows"


def corpus_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) whose axis splits corpus rows."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (ROWS,))


@functools.lru_cache(maxsize=16)
def _merge_step(mesh: Mesh, local_rows: int, local_k: int, k: int):
  """jitted (queries (Qb, D), chunk (C, D) sharded by rows, base, n_rows,
  exclude (Qb,), best_scores (Qb, k), best_index (Qb, k)) -> new best."""

  def local_top_k(q, c, base, n_rows, exclude):
    first = base + jax.lax.axis_index(ROWS) * local_rows
    index = first + jnp.arange(local_rows, dtype=jnp.int32)
    s = jnp.matmul(q, c.T, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
    # Padding rows past the corpus end and each query's excluded row never rank.
    s = jnp.where(index[None, :] < n_rows, s, -jnp.inf)
    s = jnp.where(index[None, :] == exclude[:, None], -jnp.inf, s)
    top_s, top_i = jax.lax.top_k(s, local_k)
    return top_s, index[top_i]

  sharded = jax.shard_map(
      local_top_k, mesh=mesh,
      in_specs=(P(), P(ROWS, None), P(), P(), P()),
      out_specs=(P(None, ROWS), P(None, ROWS)))

  def step(q, c, base, n_rows, exclude, best_s, best_i):
    s, i = sharded(q, c, base, n_rows, exclude)
    # Best-so-far first: on equal scores the lower corpus row wins.
    all_s = jnp.concatenate([best_s, s], axis=1)
    all_i = jnp.concatenate([best_i, i], axis=1)
    top_s, pos = jax.lax.top_k(all_s, k)
    return top_s, jnp.take_along_axis(all_i, pos, axis=1)

  return jax.jit(step, donate_argnums=(5, 6))


def exact_search(queries: np.ndarray, corpus, k: int, *, exclude: np.ndarray | None = None,
                 prepare=None, chunk_rows: int = 65536, query_block: int = 1024,
                 mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-k inner products of every query against every corpus row.

  queries: (Q, D) float; corpus: (N, D) array-like read in row slices (np.ndarray,
  np.memmap); exclude: (Q,) corpus row to leave out per query, -1 for none;
  prepare: applied to each chunk of rows on the host, (n, H) -> (n, D) (e.g. keep
  the first D coordinates and re-normalize), so one stored matrix serves every size.
  Returns (scores (Q, k') float32, rows (Q, k') int64) best first, k' = min(k, N);
  a slot with no eligible row has score -inf and row -1.
  """
  mesh = corpus_mesh() if mesh is None else mesh
  n_dev = mesh.devices.size
  queries = np.asarray(queries, np.float32)
  n_q, dim = queries.shape
  n_rows = int(corpus.shape[0])
  prepare = prepare or (lambda rows: rows)
  k = min(int(k), n_rows)
  if n_q == 0 or k == 0:
    return np.zeros((n_q, k), np.float32), np.zeros((n_q, k), np.int64)
  exclude = (np.full(n_q, -1, np.int32) if exclude is None
             else np.asarray(exclude, np.int32))
  # Chunk rows: a multiple of the device count, no larger than the corpus needs.
  chunk = -(-min(chunk_rows, n_rows) // n_dev) * n_dev
  local_rows = chunk // n_dev
  local_k = min(k, local_rows)
  qb = min(query_block, n_q)
  step = _merge_step(mesh, local_rows, local_k, k)
  rows_sharding = NamedSharding(mesh, P(ROWS, None))
  replicated = NamedSharding(mesh, P())

  blocks = []
  for start in range(0, n_q, qb):
    q = np.zeros((qb, dim), np.float32)
    e = np.full(qb, -1, np.int32)
    part = queries[start:start + qb]
    q[:len(part)], e[:len(part)] = part, exclude[start:start + qb]
    blocks.append(dict(
        q=jax.device_put(q, replicated), exclude=jax.device_put(e, replicated),
        s=jax.device_put(np.full((qb, k), -np.inf, np.float32), replicated),
        i=jax.device_put(np.full((qb, k), -1, np.int32), replicated)))
  total = jax.device_put(np.int32(n_rows), replicated)
  for base in range(0, n_rows, chunk):
    rows = np.asarray(prepare(np.asarray(corpus[base:base + chunk])), np.float32)
    if rows.shape[1] != dim:
      raise ValueError(f"queries have {dim} dims, the corpus rows {rows.shape[1]}")
    if len(rows) < chunk:
      rows = np.concatenate([rows, np.zeros((chunk - len(rows), dim), np.float32)])
    c = jax.device_put(rows, rows_sharding)
    b = jax.device_put(np.int32(base), replicated)
    for blk in blocks:
      blk["s"], blk["i"] = step(blk["q"], c, b, total, blk["exclude"], blk["s"], blk["i"])
  scores = np.concatenate([np.asarray(blk["s"]) for blk in blocks])[:n_q]
  index = np.concatenate([np.asarray(blk["i"]) for blk in blocks])[:n_q].astype(np.int64)
  index[~np.isfinite(scores)] = -1
  return scores, index
