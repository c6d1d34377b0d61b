"""The one path layer: everything a run reads or writes goes through here, so that a
`gs://bucket/...` path (or any scheme etils `epath` supports) works wherever a
local path does, and a local path behaves exactly as before.

Cloud Storage goes through gcsfs (fsspec) for small files and folders, and through
tensorstore inside Orbax for checkpoints; both take credentials from Application
Default Credentials. Three facts of object stores shape the helpers:
  - an object is written whole: there is no append (gcsfs's `open("a")` silently
    overwrites), so appended files keep their content and rewrite the object;
  - a single object write is atomic, so no temp-and-rename is needed there;
  - readers that need a local file (ArrayRecord, grain) get a local copy, cached
    by the object's generation so that an unchanged shard is fetched once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time

from etils import epath

_configured = False
_lock = threading.Lock()


def is_local(path) -> bool:
  """True for a plain filesystem path (or `file://`), False for `gs://` and the like."""
  s = os.fspath(path) if not isinstance(path, str) else path
  return "://" not in s or s.startswith("file://")


def configure_cloud_storage() -> None:
  """Sets up gcsfs before its first use (idempotent; cheap when already done).

  Plain `gcsfs.GCSFileSystem` for `gs`/`gcs`: newer gcsfs wraps it in a class whose
  gRPC bucket-layout probe stalls (and retries on every open) where that API is not
  reachable. No listings cache: objects rewritten by other writers (tensorstore, other
  hosts) must not be read with a stale size, which truncates the read silently.
  Credentials are left to gcsfs's default, Application Default Credentials.
  """
  global _configured
  if _configured:
    return
  with _lock:
    if _configured:
      return
    import fsspec
    import gcsfs.core
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
    _register_tensorboard_writer()
    _configured = True


def as_path(path) -> epath.Path:
  """`path` as an `epath.Path` (local paths with `~` expanded)."""
  if isinstance(path, epath.Path) and not is_local(path):
    configure_cloud_storage()
    return path
  s = os.fspath(path)
  if is_local(s):
    return epath.Path(os.path.expanduser(s.removeprefix("file://")))
  configure_cloud_storage()
  return epath.Path(s)


def join(path, *parts: str) -> str:
  """`path/part/...` as a string, keeping `gs://` intact."""
  return os.fspath(as_path(path).joinpath(*parts)) if parts else os.fspath(as_path(path))


def exists(path) -> bool:
  return as_path(path).exists()


def isdir(path) -> bool:
  return as_path(path).is_dir()


def makedirs(path) -> None:
  """Creates the folder (a no-op on object stores, where folders are prefixes)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
  return as_path(path).read_text(encoding="utf-8")


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def read_json(path):
  return json.loads(read_text(path))


def write_atomic(path, data: str | bytes) -> None:
  """Writes `path` whole or not at all: a temp file renamed over it locally, one
  object write on an object store (objects appear only when complete)."""
  p = as_path(path)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if not is_local(p):
    p.write_bytes(payload)
    return
  local = os.fspath(p)
  directory = os.path.dirname(local) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(local))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.chmod(tmp, 0o644)
    os.replace(tmp, local)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def rename(src, dst) -> None:
  """Moves a file or folder (a copy and delete per object on object stores)."""
  as_path(src).rename(as_path(dst))


class AppendFile:
  """A text file opened for appending, also on object stores.

  Locally: `open(path, "a")`, flushed on every `flush`. On an object store: the
  existing content is read once, new lines are kept in memory, and the whole object
  is rewritten on `flush` at most every `min_interval_s` seconds (always on `close`).
  """

  def __init__(self, path, min_interval_s: float = 10.0):
    self._path = as_path(path)
    self._local = is_local(self._path)
    self._min_interval_s = min_interval_s
    if self._local:
      self._file = open(os.fspath(self._path), "a", encoding="utf-8")
    else:
      self._text = [self._path.read_text(encoding="utf-8")] if self._path.exists() else []
      self._dirty, self._last = False, 0.0

  def write(self, text: str) -> None:
    if self._local:
      self._file.write(text)
    else:
      self._text.append(text)
      self._dirty = True

  def flush(self, force: bool = False) -> None:
    if self._local:
      self._file.flush()
    elif self._dirty and (force or time.monotonic() - self._last >= self._min_interval_s):
      self._path.write_text("".join(self._text), encoding="utf-8")
      self._dirty, self._last = False, time.monotonic()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self.flush(force=True)


def cache_root() -> str:
  """Where local copies of cloud files live: `$AMOS_CACHE_DIR`, else
  `~/.cache/amos_jax`."""
  return os.environ.get("AMOS_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "amos_jax")


def _fingerprint(info: dict) -> str:
  """What changes when an object is rewritten (its generation where the store has one)."""
  return "|".join(str(info.get(k, "")) for k in ("size", "generation", "md5Hash", "crc32c",
                                                  "updated", "mtime", "ETag"))


def local_copy(path, cached: bool = True) -> str:
  """A local path holding `path` (a file or a folder): `path` itself when local.

  Cloud files are copied into `cache_root()/remote/<hash of the path>/`; with
  `cached`, a file whose size and generation are unchanged is not fetched again
  (prepared shards, read many times). Without it, a fresh temporary copy is made
  (small mutable files such as a tokenizer folder).
  """
  if is_local(path):
    return os.fspath(as_path(path))
  src = as_path(path)
  remote = os.fspath(src).rstrip("/")
  key = hashlib.sha1(remote.encode()).hexdigest()[:16]
  if cached:
    root = os.path.join(cache_root(), "remote", key)
  else:
    root = tempfile.mkdtemp(prefix="amos_jax-copy-")
  import fsspec
  protocol, bare = remote.split("://", 1)
  fs = fsspec.filesystem(protocol)
  infos = fs.find(remote, detail=True) if fs.isdir(remote) else {bare: fs.info(remote)}
  dest = os.path.join(root, os.path.basename(remote))
  for name, info in infos.items():
    name = name.split("://", 1)[-1]
    rel = os.path.relpath(name, bare) if name != bare else ""
    target = os.path.join(dest, rel) if rel else dest
    stamp = os.path.join(root, ".stamps", rel or os.path.basename(dest))
    want = _fingerprint(info)
    if cached and os.path.exists(target) and os.path.exists(stamp):
      with open(stamp, encoding="utf-8") as f:
        if f.read() == want:
          continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    fs.get_file(f"{protocol}://{name}", tmp)
    os.replace(tmp, target)
    if cached:
      os.makedirs(os.path.dirname(stamp), exist_ok=True)
      with open(stamp, "w", encoding="utf-8") as f:
        f.write(want)
  if not infos:
    os.makedirs(dest, exist_ok=True)
  return dest


def copy_up(local_dir: str, dest) -> None:
  """Copies the files of the local folder `local_dir` to `dest` (any path)."""
  target = as_path(dest)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    folder = target if rel == "." else target.joinpath(*rel.split(os.sep))
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        (folder / name).write_bytes(f.read())


def copy_file(src, dst) -> None:
  """Copies one file between any two paths."""
  as_path(dst).write_bytes(as_path(src).read_bytes())


def _register_tensorboard_writer() -> None:
  """tensorboardX writes `gs://` event files through this layer (its own writer would
  need google-cloud-storage's separate credentials and settings)."""
  try:
    from tensorboardX import record_writer
  except ImportError:  # pragma: no cover - tensorboardX is a pinned dependency
    return
  record_writer.register_writer_factory("gs", _EventFileFactory())


class _EventFile:
  """An event file kept in memory and rewritten whole on flush (objects are immutable)."""

  def __init__(self, path):
    import io
    self._path, self._buf, self._dirty, self._closed = epath.Path(path), io.BytesIO(), True, False

  def write(self, data):
    self._buf.write(data)
    self._dirty = True

  def flush(self):
    if self._dirty:
      self._path.write_bytes(self._buf.getvalue())
      self._dirty = False

  def close(self):
    if not self._closed:
      self.flush()
      self._closed = True


class _EventFileFactory:

  def open(self, path):
    return _EventFile(path)

  def directory_check(self, path):
    pass  # folders are prefixes on an object store
