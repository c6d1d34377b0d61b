"""An export's output folder: vetted before anything is read, written whole or not at all.

amos-export never writes inside the run it exports, and never over a folder it did
not write; an earlier export (every file listed in its `amos_export.json`) is
replaced. The folder is assembled next to its final place and renamed into it, with
the modes a plain `open()` gives (safetensors and mkdtemp make private files).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from amos_jax.errors import ExportError

MANIFEST = "amos_export.json"


def _files_under(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def _earlier_export(out: str) -> bool:
  """True if every file in `out` is one an earlier amos-export listed as its own."""
  try:
    with open(os.path.join(out, MANIFEST)) as f:
      listed = set(json.load(f)["files"])
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return set(_files_under(out)) <= listed | {MANIFEST}


def check_out(workdir: str, out: str) -> str:
  """The absolute --out; refuses a folder whose writing would harm something."""
  target, run = os.path.realpath(out), os.path.realpath(workdir)
  if target == run or target.startswith(run.rstrip(os.sep) + os.sep):
    raise ExportError(f"--out {out} is inside the run --workdir {workdir}; the export "
                      "would write over the run's files (its config.json): choose a "
                      "folder outside it")
  if os.path.exists(target):
    if not os.path.isdir(target):
      raise ExportError(f"--out {out} is a file; give a new folder")
    if os.listdir(target) and not _earlier_export(target):
      raise ExportError(f"--out {out} is a non-empty folder that amos-export did not "
                        "write; give a new or empty folder (an earlier export is replaced)")
  ancestor = os.path.dirname(target)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise ExportError(f"--out {out}: {ancestor} is a file, not a folder")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise ExportError(f"--out {out}: {ancestor} is not writable")
  return target


def _normal_modes(root: str) -> None:
  """Files as a plain open() makes them (0644 under umask 022), not safetensors' or
  mkdtemp's private 0600 / 0700."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(root, 0o777 & ~umask)
  for d, dirs, files in os.walk(root):
    for name in dirs:
      os.chmod(os.path.join(d, name), 0o777 & ~umask)
    for name in files:
      os.chmod(os.path.join(d, name), 0o666 & ~umask)


def write_out(out: str, write, manifest: dict) -> None:
  """Runs `write(folder)` on a fresh sibling folder, then puts it in place of `out`
  (`check_out` has vetted it): a failed export leaves `out` as it was."""
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
  except OSError as e:
    raise ExportError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None
  trash = None
  try:
    write(staging)
    with open(os.path.join(staging, MANIFEST), "w") as f:
      json.dump(dict(manifest, files=_files_under(staging) + [MANIFEST]), f, indent=2)
    _normal_modes(staging)
    if os.path.isdir(out) and os.listdir(out):  # an earlier export: set aside, then drop
      trash = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old-")
      os.rename(out, os.path.join(trash, "old"))
    os.replace(staging, out)
  except OSError as e:
    if trash is not None and not os.path.exists(out):
      os.rename(os.path.join(trash, "old"), out)
    raise ExportError(f"--out {out}: cannot write ({e.strerror or e})") from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  if trash is not None:
    shutil.rmtree(trash, ignore_errors=True)
