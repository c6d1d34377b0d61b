"""The metric at every 2D-Matryoshka size (layer x dim) and its heatmap.

Sizes: layers 1..L (hidden_states[l]) x dims (powers of two up to the width, plus the
width). Texts are embedded once, pooled at every layer; each size then only slices
and re-normalizes, so a grid costs one pass of the model over the data.
"""
from __future__ import annotations

import numpy as np

from amos_jax.eval import retrieval, sts
from amos_jax.eval.model import EmbeddingModel, embed_layers, truncate_normalize


def grid_dims(width: int, smallest: int = 32) -> list[int]:
  """Powers of two from `smallest` below the width, then the width itself."""
  dims, d = [], 1
  while d < width:
    if d >= min(smallest, width):
      dims.append(d)
    d *= 2
  return dims + [width]


def sts_grid(model: EmbeddingModel, sets: list[sts.STSSet], layers, dims, *,
             pooling=None, **kw) -> np.ndarray:
  """(len(layers), len(dims)) Spearman x100 (the mean over sets when several)."""
  texts = sorted({t for s in sets for t in s.s1 + s.s2})
  pooled = embed_layers(model, texts, layers, pooling=pooling, **kw)
  values = np.zeros((len(layers), len(dims)))
  for i in range(len(layers)):
    for j, d in enumerate(dims):
      emb = truncate_normalize(pooled[i], d)
      rows = sts.evaluate_sets(sets, lambda _: emb)
      values[i, j] = rows[-1 if len(sets) > 1 else 0]["spearman"]
  return values


def retrieval_grid(model: EmbeddingModel, beir: retrieval.BEIRSet, layers, dims, *,
                   metric: str = "ndcg@10", similarity: str = "cos", **kw) -> np.ndarray:
  """(len(layers), len(dims)) of one retrieval metric (x100)."""
  sizes = [(l, d) for l in layers for d in dims]
  res = retrieval.evaluate_sizes(model, beir, sizes, similarity=similarity,
                                 metrics=(metric,), **kw)
  return np.array([[100.0 * res[(l, d)][metric] for d in dims] for l in layers])


def plot(path: str, panels: list[dict], metric: str) -> None:
  """Heatmaps side by side on one colour scale, plus a difference panel for two.

  panels: [{title, layers, dims, values (len(layers), len(dims))}].
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  vmin = min(float(np.nanmin(p["values"])) for p in panels)
  vmax = max(float(np.nanmax(p["values"])) for p in panels)
  extra = []
  if len(panels) == 2:
    a, b = panels
    layers = [l for l in a["layers"] if l in b["layers"]]
    dims = [d for d in a["dims"] if d in b["dims"]]
    if layers and dims:
      pick = lambda p: p["values"][np.ix_([p["layers"].index(l) for l in layers],
                                          [p["dims"].index(d) for d in dims])]
      extra.append(dict(title=f"{b['title']} - {a['title']}", layers=layers, dims=dims,
                        values=pick(b) - pick(a), diff=True))
  shown = panels + extra
  fig, axes = plt.subplots(1, len(shown), squeeze=False,
                           figsize=(1.0 + 0.75 * sum(len(p["dims"]) + 1.5 for p in shown),
                                    1.5 + 0.5 * max(len(p["layers"]) for p in shown)))
  for ax, p in zip(axes[0], shown):
    v = np.asarray(p["values"], float)
    if p.get("diff"):
      lim = max(float(np.nanmax(np.abs(v))), 1e-9)
      im = ax.imshow(v, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    else:
      im = ax.imshow(v, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                     aspect="auto")
    for i in range(v.shape[0]):
      for j in range(v.shape[1]):
        # White text on dark cells: viridis' low end, RdBu's two ends.
        dark = (abs(v[i, j]) > 0.6 * lim if p.get("diff")
                else (v[i, j] - vmin) < 0.6 * (vmax - vmin + 1e-9))
        ax.text(j, i, f"{v[i, j]:+.1f}" if p.get("diff") else f"{v[i, j]:.1f}",
                ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(p["dims"])), [str(d) for d in p["dims"]])
    ax.set_yticks(range(len(p["layers"])), [str(l) for l in p["layers"]])
    ax.set_xlabel("dim")
    ax.set_ylabel("layer")
    ax.set_title(p["title"], fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle(metric)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
