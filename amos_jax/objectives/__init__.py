"""Training objectives: one module each, defining `OBJECTIVE` (an `Objective`
subclass, see `base.py`); `objective.name` in the config is the module's name. A new
objective is one new module here and a config; a module elsewhere is named by its
full import path (`objective.name=mypackage.my_objective`)."""
from __future__ import annotations

import importlib
import pkgutil

from amos_jax.errors import ConfigError
from amos_jax.objectives.base import HFModel, Objective, SpecialTokens  # noqa: F401

_NOT_OBJECTIVES = ("base", "masking", "sampling")


def available() -> tuple[str, ...]:
  """The names `objective.name` accepts."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if m.name not in _NOT_OBJECTIVES and not m.name.startswith("_")))


def get_objective_class(name: str) -> type[Objective]:
  """The Objective subclass of `objective.name` (a module here, or a dotted path)."""
  if "." in name:
    try:
      module = importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f"objective.name={name!r}: cannot import it ({e}); give one of "
                        f"{', '.join(available())} or an importable module") from None
  elif name in available():
    module = importlib.import_module(f"amos_jax.objectives.{name}")
  else:
    raise ConfigError(f"objective.name={name!r} is unknown; choose one of "
                      f"{', '.join(available())}")
  cls = getattr(module, "OBJECTIVE", None)
  if not (isinstance(cls, type) and issubclass(cls, Objective)):
    raise ConfigError(f"objective.name={name!r}: its module defines no OBJECTIVE (an "
                      "Objective subclass)")
  return cls


def get_objective(config, tokens: SpecialTokens | None = None) -> Objective:
  """The configured objective, with the tokenizer's special ids."""
  return get_objective_class(config.objective.name)(config, tokens)
