"""Metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.
Only the primary process writes."""
from __future__ import annotations

import json

import jax
import numpy as np

from amos_jax import paths


class MetricsWriter:

  def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
    """purge_step: TensorBoard hides this run's earlier events at steps >= it (a
    resumed run recomputes them)."""
    self.enabled = enabled
    self._tb = None
    self._file = None
    if enabled:
      paths.makedirs(workdir)
      # On gs:// the object is rewritten whole, at most every 10 s and on close.
      self._file = paths.AppendFile(paths.join(workdir, "metrics.jsonl"))
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"),
                               purge_step=purge_step)

  def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
    """Writes scalars at `step`; returns them as plain floats."""
    scalars = {prefix + k: float(np.asarray(jax.device_get(v)))
               for k, v in metrics.items()}
    if self.enabled:
      self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self._file.flush()
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))
    return scalars

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in order."""
  text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]
