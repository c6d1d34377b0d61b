"""A train step's wall time by XLA kernel, from a `jax.profiler` trace (used by
benchmarks/step_profile.py).

`attribute` splits every moment of the traced wall time among the kernels (thunks)
running then on XLA's threads, equally among those running at once; a moment with
none running goes to the kernel that ended last, since XLA:CPU's Eigen products run
after their launch event ends, with no event of their own (BENCHMARKS.md, sixteenth
stop). The attribution adds up to the traced span.
"""
from __future__ import annotations

import bisect
import collections
import glob
import os
import re

# Events that are not kernels: the executor's own spans and thread-pool bookkeeping.
_NOT_KERNELS = ("ThunkExecutor", "Threadpool", "SlinkyThreadPool", "end: ")


def attribute(events, span=None) -> collections.Counter:
  """{kernel name: seconds of wall time} from (start, end, name) events.

  Each moment is split equally among the events covering it; a moment no event
  covers goes to the event that ended last before it (the time before the first
  event starts goes nowhere). With span=(t0, t1) the attribution covers t0..t1 and
  adds up to t1 - t0 less any lead-in before the first event.
  """
  events = sorted(events)
  if not events:
    return collections.Counter()
  t0, t1 = span if span else (events[0][0], max(e for _, e, _ in events))
  bounds = sorted({t0, t1, *(s for s, _, _ in events), *(e for _, e, _ in events)})
  bounds = [b for b in bounds if t0 <= b <= t1]
  active = [[] for _ in range(len(bounds) - 1)]
  for s, e, name in events:
    for i in range(bisect.bisect_left(bounds, max(s, t0)),
                   bisect.bisect_left(bounds, min(e, t1))):
      active[i].append(name)
  ends = sorted((e, name) for _, e, name in events)
  end_times = [e for e, _ in ends]
  out = collections.Counter()
  for i, names in enumerate(active):
    width = bounds[i + 1] - bounds[i]
    if names:
      for name in names:
        out[name] += width / len(names)
      continue
    last = bisect.bisect_right(end_times, bounds[i]) - 1
    if last >= 0:
      out[ends[last][1]] += width
  return out


def kind(name: str) -> str:
  return re.sub(r"\.\d+$", "", name)


def trace_events(trace_dir: str):
  """(start, end, name) seconds of the kernels on XLA's CPU threads in a trace."""
  import jax
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  events = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:
        continue
      for ev in line.events:
        if not ev.name.startswith(_NOT_KERNELS):
          events.append((ev.start_ns * 1e-9, (ev.start_ns + ev.duration_ns) * 1e-9,
                         ev.name))
  return events


def hlo_index(text: str):
  """{instruction: (shape, op_name, computation)} of a compiled HLO module's text."""
  index, computation = {}, None
  for line in text.split("\n"):
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(("HloModule", " ")):
      computation = head.group(1)
      continue
    m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      index[m.group(1)] = (m.group(2), op.group(1) if op else "", computation)
  return index
