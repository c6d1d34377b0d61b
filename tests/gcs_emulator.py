"""A local Cloud Storage emulator for the tests: `gcp-storage-emulator` plus the three
things gcsfs and tensorstore (Orbax) need that it lacks.

1. objects.moveTo (gcsfs renames with it; the stock emulator answers 501, which gcsfs
   retries with backoff for half a minute per renamed file before copy+delete).
2. x-goog-generation / x-goog-metageneration headers on media downloads (tensorstore
   takes the object generation from them; without, OCDBT, Orbax's default format,
   fails with "Malformed StorageGeneration").
3. ifGenerationMatch / ifGenerationNotMatch preconditions (412 / 304), which tensorstore
   uses for OCDBT manifest commits and cache revalidation.

Run as a script (`python tests/gcs_emulator.py start --port N ...`) it is the server;
imported, `start(bucket)` runs it as a subprocess on a free 127.0.0.1 port and
`client_env(port)` is the environment that points gcsfs and tensorstore at it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(port: int) -> dict[str, str]:
  url = f"http://127.0.0.1:{port}"
  return {
      # gcsfs and google-cloud-storage: the endpoint.
      "STORAGE_EMULATOR_HOST": url,
      # gcsfs: no gRPC bucket-layout probe (amos_jax.paths also registers plain gcsfs).
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # fsspec config read at import -> kwargs of every gcsfs instance: anonymous,
      # no credential discovery; no listings cache.
      "FSSPEC_GCS": '{"token": "anon", "use_listings_cache": false}',
      # tensorstore (Orbax): endpoint and a fixed bearer token.
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
      "TENSORSTORE_GCS_HTTP_VERSION": "1.1",
      # No metadata-server probing off the loopback.
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9",
  }


def use_in_this_process(port: int) -> None:
  """Points this process's clients at the emulator (fsspec may be imported already)."""
  os.environ.update(client_env(port))
  import fsspec
  conf = fsspec.config.conf.setdefault("gcs", {})
  conf.update(token="anon", use_listings_cache=False)
  fsspec.config.conf.setdefault("gs", {}).update(conf)
  from amos_jax import paths
  paths.configure_cloud_storage()
  fsspec.filesystem("gs").invalidate_cache()


def _wait_up(port: int, proc, timeout: float = 30.0) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the storage emulator exited with status {proc.returncode}")
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b", timeout=1)
      return
    except Exception:  # noqa: BLE001 - not up yet
      time.sleep(0.1)
  raise RuntimeError("the storage emulator did not come up in 30 s")


def create_bucket(port: int, name: str) -> None:
  req = urllib.request.Request(
      f"http://127.0.0.1:{port}/storage/v1/b?project=test",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(req, timeout=10).read()


def start(bucket: str = "amos-test") -> tuple[subprocess.Popen, int]:
  """The emulator as a subprocess (in memory) holding `bucket`: (process, port)."""
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "start", "-H", "127.0.0.1", "--port",
       str(port), "--in-memory", "-q", "--default-bucket", bucket],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_up(port, proc)
  except BaseException:
    proc.kill()
    raise
  return proc, port


def _patch_server() -> None:
  from http import HTTPStatus

  from gcp_storage_emulator import server, settings
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  def current_generation(storage, bucket, name):
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  def query(request, key):
    v = request.query.get(key)
    return v[0] if v else None

  def move(request, response, storage, *args, **kwargs):
    b, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
      obj = objects._copy(request.base_url, storage, b, src, b, dst)
      storage.delete_file(b, src)
      response.json(obj)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND

  orig_download, orig_insert = objects.download, objects.insert

  def download(request, response, storage, *args, **kwargs):
    b, name = request.params["bucket_name"], request.params["object_id"]
    gen = current_generation(storage, b, name)
    match, not_match = query(request, "ifGenerationMatch"), query(request, "ifGenerationNotMatch")
    if gen != "0":
      if match is not None and match != gen:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
      if not_match is not None and not_match == gen:
        response.status = HTTPStatus.NOT_MODIFIED
        response["x-goog-generation"] = gen
        return
      obj = storage.get_file_obj(b, name)
      response["x-goog-generation"] = gen
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return orig_download(request, response, storage, *args, **kwargs)

  def insert(request, response, storage, *args, **kwargs):
    match = query(request, "ifGenerationMatch")
    if match is not None:
      name = query(request, "name")
      if name is None:  # multipart: the name is in the JSON part; let it through
        return orig_insert(request, response, storage, *args, **kwargs)
      if current_generation(storage, request.params["bucket_name"], name) != match:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    return orig_insert(request, response, storage, *args, **kwargs)

  objects.download = download  # objects.get(alt=media) calls the module global
  objects.insert = insert  # the router falls back to objects.insert for bare POST uploads
  p = settings.API_ENDPOINT
  swap = {orig_download: download, orig_insert: insert}
  server.HANDLERS = (
      (rf"^{p}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
       rf"(?P<dest_object_id>.*[^/]+)$", {server.POST: move}),
  ) + tuple((rx, {m: swap.get(f, f) for m, f in h.items()}) for rx, h in server.HANDLERS)


if __name__ == "__main__":
  _patch_server()
  from gcp_storage_emulator.__main__ import main
  main(sys.argv[1:])
