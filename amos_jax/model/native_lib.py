"""The C++ custom calls for XLA:CPU in `native/`, built into one library on first use.

`native/batched_matmul.cc` (attention's products, `cpu_matmul`),
`native/dropout_keep.cc` (dropout's keep masks, `rng`), `native/attention.cc`
(attention's fused core, `cpu_attention`), `native/layer_norm.cc` (LayerNorm's
forward and backward passes, `cpu_layer_norm`) and `native/gelu.cc` (GELU's
backward pass, `cpu_gelu`) are compiled together with
the system C++ compiler against jaxlib's FFI headers, cached under
`cache_root()/native/<hash of sources, flags, jax>/` and written atomically (several
processes may race to build it). `load()` builds, loads and registers every target
once per process; `unavailable_reason()` says why it could not ('' when it could),
and the callers then keep XLA's own form (`choose`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from amos_jax import paths
from amos_jax.model import partitioning

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
SOURCES = tuple(os.path.join(_DIR, f)
                for f in ("batched_matmul.cc", "dropout_keep.cc", "attention.cc",
                          "layer_norm.cc", "gelu.cc"))
_HEADERS = tuple(os.path.join(_DIR, f) for f in ("isa.h", "kernels.h", "parallel.h"))
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# FFI target name -> the handler symbol the library exports.
TARGETS = {"amos_batched_matmul": "AmosBatchedMatmul",
           "amos_dropout_keep": "AmosDropoutKeep",
           "amos_attention_fwd": "AmosAttentionForward",
           "amos_attention_bwd": "AmosAttentionBackward",
           "amos_layer_norm_fwd": "AmosLayerNormForward",
           "amos_layer_norm_bwd": "AmosLayerNormBackward",
           "amos_gelu_bwd": "AmosGeluBackward"}
# The kernels each file compiles per ISA: `<name>_isa()` says which one runs,
# `<name>_use_isa(name)` switches (tests compare them).
KERNELS = ("amos_batched_matmul", "amos_dropout_keep", "amos_attention", "amos_layer_norm",
           "amos_gelu")


def library_path() -> str:
  digest = hashlib.sha256()
  for path in SOURCES + _HEADERS:
    with open(path, "rb") as f:
      digest.update(f.read())
  digest.update((" ".join(_FLAGS) + jax.ffi.include_dir() + jax.__version__).encode())
  return os.path.join(paths.cache_root(), "native", digest.hexdigest()[:16], "libamos_native.so")


def _compile(target: str) -> None:
  """Compiles the sources into `target`, atomically: each source to an object file
  in a private temporary folder, all at once (one compiler process per source, about
  half the time on two cores), then links them."""
  compiler = os.environ.get("CXX", "c++")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as work:
    objects = [os.path.join(work, f"{i}.o") for i in range(len(SOURCES))]
    compile_flags = [f for f in _FLAGS if f != "-shared"]
    commands = [[compiler, *compile_flags, f"-I{jax.ffi.include_dir()}", "-c", src, "-o", obj]
                for src, obj in zip(SOURCES, objects)]
    tmp = os.path.join(work, "lib.so")
    try:
      running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for cmd in commands]
      for src, proc in zip(SOURCES, running):
        _, err = proc.communicate()
        if proc.returncode != 0:
          raise RuntimeError(f"{compiler} failed on {src}: {err.strip()[-400:]}")
      done = subprocess.run([compiler, *_FLAGS, *objects, "-o", tmp], capture_output=True,
                            text=True)
    except FileNotFoundError:
      raise RuntimeError(f"no C++ compiler ({compiler}) was found: install g++ "
                         "or set CXX") from None
    if done.returncode != 0:
      raise RuntimeError(f"{compiler} failed to link {target}: {done.stderr.strip()[-400:]}")
    os.replace(tmp, target)


_LIB = None


@functools.lru_cache(maxsize=None)
def _load() -> str:
  global _LIB
  try:
    target = library_path()
    if not os.path.exists(target):
      _compile(target)
    lib = ctypes.CDLL(target)
    for kernel in KERNELS:
      getattr(lib, f"{kernel}_isa").restype = ctypes.c_char_p
      getattr(lib, f"{kernel}_use_isa").argtypes = [ctypes.c_char_p]
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except Exception as e:  # noqa: BLE001 - any failure means: use XLA's form
    return f"{type(e).__name__}: {e}"
  _LIB = lib
  return ""


def unavailable_reason() -> str:
  """'' when the library is built, loaded and registered, else why not (one line)."""
  return _load()


def load():
  """The loaded library (ctypes.CDLL); RuntimeError where it could not be built."""
  why = _load()
  if why:
    raise RuntimeError(f"the native custom calls are unavailable: {why}")
  return _LIB


def isa(kernel: str) -> str:
  """The ISA `kernel` (one of KERNELS) runs: 'avx512', 'avx2' or 'generic'; '' where
  the library is unavailable."""
  if _load():
    return ""
  return getattr(_LIB, f"{kernel}_isa")().decode()


def use_isa(kernel: str, name: str) -> bool:
  """Runs `kernel`'s build for ISA `name` from now on (tests compare them); False
  where it is not compiled in, the CPU lacks it or the library is unavailable."""
  return not _load() and bool(getattr(_LIB, f"{kernel}_use_isa")(name.encode()))


def choose(option: str, implementation: str, why_not: str, fallback: str) -> str:
  """'native' or 'xla': what runs for `option` (e.g. 'model.dropout_impl') set to
  implementation ('auto' or 'native'), where why_not says why the custom call does
  not apply by design ('' where it does: the right backend, dtype, an unpartitioned
  program). 'native' needs that and the library built. An explicit 'native' that
  cannot run, or a library that did not build, logs one warning that names the
  fallback; 'auto' says nothing where the kernel does not apply by design."""
  from amos_jax.model.rng import warn_once  # rng imports this module
  failed = "" if why_not else unavailable_reason()
  if not why_not and not failed:
    return "native"
  if implementation == "native" or failed:
    why = why_not or f"the custom call did not build ({failed})"
    warn_once(f"{option}={implementation}: {why}; using {fallback}")
  return "xla"


def resolve(option: str, implementation: str | None, choices, *, what: str, fallback: str,
            dtype=jnp.float32, platform: str | None = None, mesh=None,
            why_not: str = "") -> str:
  """'auto' | 'xla' | 'native' (None: 'auto') for `option` (e.g. 'model.layer_norm_impl',
  one of `choices`) -> the one that runs. 'native' (the custom call `what` names)
  needs float32 `dtype`, the CPU, a program XLA does not partition itself
  (`partitioning.custom_call_partitioned`), nothing else against it (`why_not`) and
  the library built; see `choose` for the warnings. platform and mesh default to the
  current abstract mesh's (the backend's outside a mesh), as attention's choice."""
  implementation = implementation or "auto"
  if implementation not in choices:
    key = option.rsplit(".", 1)[-1]
    raise ValueError(f"{key}={implementation!r}: use one of {choices}")
  if implementation == "xla":
    return "xla"
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  platform = platform or partitioning.mesh_platform(mesh)
  why_not = why_not or cpu_kernel_unavailable(what, dtype, platform, mesh)
  return choose(option, implementation, why_not, fallback)


def cpu_kernel_unavailable(what: str, dtype, platform: str, mesh) -> str:
  """Why a float32 CPU custom call (`what` names it) does not apply here by design:
  another backend, another dtype, or a program XLA partitions itself; '' where it
  does (whether the library builds is asked apart)."""
  if platform != "cpu":
    return f"{what}: the CPU only, not {platform}"
  if jnp.dtype(dtype) != jnp.float32:
    return f"{what}: float32 only, not {jnp.dtype(dtype).name}"
  return partitioning.custom_call_partitioned(mesh)
