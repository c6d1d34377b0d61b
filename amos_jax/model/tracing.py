"""Building nnx models inside a trace in time linear in the parameter count.

`nnx.Rngs` counts its draws in a Variable, and flax's `Variable.set_value` compares
the new count's `sharding` with the old count's through `getattr(value, "sharding",
None)`. On a tracer that attribute raises AttributeError, and JAX writes the
error's message before raising it: `DynamicJaxprTracer._origin_msg` walks the
trace back to the value's origins (`find_progenitors`), a pass over every equation
traced so far. `getattr` then drops the message. A model build draws one key per
parameter, so tracing it (`jax.jit` or `eval_shape` of an init function) costs time
quadratic in the number of parameters: building ELECTRA-small's two encoders
(804 draws) spent about 6 s of an 8 s abstract build in these walks, and 3.5 s of
its init's 4.7 s lowering (BENCHMARKS.md, "Time to the first step").

`cheap_tracer_errors()` leaves the origin out of tracer error messages while a
model is built. The AttributeError is still raised, so `getattr` and `hasattr` give
what they gave; only the text of an error raised inside the block is shorter.
Nothing traced changes.
"""
from __future__ import annotations

import contextlib
import threading

from jax._src.interpreters import partial_eval as _pe

# The tracer class whose error messages walk the trace (tests/test_tracing.py
# fails if JAX renames it, so an upgrade cannot silently bring the cost back).
TRACER = _pe.DynamicJaxprTracer
_ORIGINAL = TRACER.__dict__.get("_origin_msg")
_lock = threading.Lock()
_depth = 0


def _no_origin(self) -> str:
  del self
  return ""


@contextlib.contextmanager
def cheap_tracer_errors():
  """Within the block, tracer error messages skip the walk to the value's origin.

  Re-entrant and thread-safe: the original method is restored when the last
  block exits, exception or not.
  """
  global _depth
  if _ORIGINAL is None:  # nothing to shorten in this JAX
    yield
    return
  with _lock:
    if _depth == 0:
      TRACER._origin_msg = _no_origin
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        TRACER._origin_msg = _ORIGINAL
