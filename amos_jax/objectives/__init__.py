"""Pre-training objectives. Each module exposes `build_model(config, rngs)` and
`compute_loss(model, batch, rng, config, train) -> (loss, metrics)`."""
from __future__ import annotations

import importlib

OBJECTIVES = ("mlm", "electra", "amos")


def get_objective(name: str):
  """The objective module by its config name (`objective.name`)."""
  if name not in OBJECTIVES:
    raise ValueError(f"objective.name={name!r} is unknown; choose one of {OBJECTIVES}")
  return importlib.import_module(f"amos_jax.objectives.{name}")
