"""The CPU kernel for attention's products (`cpu_matmul.einsum`), attention_impl='gemm'.

The custom call must give NumPy's einsum for every operand layout attention uses (and
odd sizes, one head, strided heads read in place) with every kernel the CPU can run,
the gradients of jnp.einsum, and,
inside attention, XLA's attention to float32 rounding, with masks, bias and dropout.
'auto' must pick it on the CPU in float32 and nowhere it cannot run. The library
must build here: a machine without a C++ compiler fails this file rather than
skipping it, since 'auto' would then silently run the slower XLA products.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from amos_jax.model import attention, cpu_matmul
from amos_jax.model import rng as rng_lib
from amos_jax.model.partitioning import mesh_platform

SPECS = ["btnd,bsnd->bnts",   # logits; dprobs from (g, v)
         "bnts,bsnd->btnd",   # context; dq from (dlogits, k)
         "bnts,btnd->bsnd",   # dv from (probs, g); dk from (dlogits, q)
         "btnd,bnts->bsnd"]   # the same product with its operands given the other way


def _operands(spec, sizes, seed=0):
  r = np.random.default_rng(seed)
  lhs, rhs = spec.split("->")[0].split(",")
  return [r.standard_normal([sizes[c] for c in letters]).astype(np.float32)
          for letters in (lhs, rhs)]


def test_the_library_builds_and_loads():
  assert cpu_matmul.available(), cpu_matmul.unavailable_reason()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("sizes", [dict(b=3, t=7, s=5, n=2, d=3),
                                   dict(b=2, t=16, s=16, n=1, d=8),
                                   dict(b=1, t=4, s=9, n=3, d=1),
                                   dict(b=0, t=3, s=2, n=2, d=4)])
def test_einsum_equals_numpy(spec, sizes):
  x, y = _operands(spec, sizes)
  got = jax.jit(lambda x, y: cpu_matmul.einsum(spec, x, y))(x, y)
  np.testing.assert_allclose(got, np.einsum(spec, x, y), rtol=1e-5, atol=1e-5)


def _cpu_flags() -> set:
  for line in open("/proc/cpuinfo"):
    if line.startswith("flags"):
      return set(line.split(":", 1)[1].split())
  return set()


def test_the_kernel_is_the_best_the_cpu_has():
  flags = _cpu_flags()
  want = ("avx512" if "avx512f" in flags else
          "avx2" if {"avx2", "fma"} <= flags else "generic")
  assert cpu_matmul.isa() == want


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_kernel_the_cpu_runs_equals_numpy(isa):
  """Each compiled kernel (vector width, rows per block, the column and row tails)
  on the attention layouts and sizes that are not multiples of its blocks."""
  best = cpu_matmul.isa()
  if not cpu_matmul.use_isa(isa):
    flags = _cpu_flags()
    assert (isa == "avx512" and "avx512f" not in flags) or (
        isa == "avx2" and not {"avx2", "fma"} <= flags), f"{isa} refused on {best}"
    return
  try:
    for spec in SPECS:
      for sizes in (dict(b=2, t=37, s=45, n=3, d=19), dict(b=1, t=128, s=128, n=2, d=64)):
        x, y = _operands(spec, sizes, seed=4)
        got = jax.jit(lambda x, y, spec=spec: cpu_matmul.einsum(spec, x, y))(x, y)
        np.testing.assert_allclose(got, np.einsum(spec, x, y), rtol=1e-4, atol=1e-4,
                                   err_msg=f"{isa} {spec} {sizes}")
  finally:
    assert cpu_matmul.use_isa(best)


@pytest.mark.parametrize("spec", SPECS[:3])
def test_einsum_gradients_equal_jnp_einsum(spec):
  x, y = _operands(spec, dict(b=2, t=6, s=5, n=3, d=4), seed=1)
  w = np.random.default_rng(2).standard_normal(np.einsum(spec, x, y).shape)

  def loss(f):
    return jax.jit(jax.grad(lambda x, y: jnp.sum(f(spec, x, y) * w), argnums=(0, 1)))

  for got, want in zip(loss(cpu_matmul.einsum)(x, y), loss(jnp.einsum)(x, y)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_under_vmap_equals_numpy():
  spec = SPECS[0]
  x, y = _operands("zbtnd,zbsnd->zbnts", dict(z=3, b=2, t=4, s=4, n=2, d=5))
  got = jax.jit(jax.vmap(lambda x, y: cpu_matmul.einsum(spec, x, y)))(x, y)
  np.testing.assert_allclose(got, np.einsum("zbtnd,zbsnd->zbnts", x, y), rtol=1e-5,
                             atol=1e-5)


def test_einsum_refuses_what_it_cannot_compute():
  x = np.ones((2, 3, 4, 5), np.float32)
  with pytest.raises(ValueError, match="batch letters"):
    cpu_matmul.einsum("btnd,btnd->bn", x, x)
  with pytest.raises(TypeError, match="float32"):
    cpu_matmul.einsum(SPECS[0], x.astype(np.float16), x.astype(np.float16))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gemm_attention_equals_xla_attention(dropout):
  r = np.random.default_rng(3)
  b, t, n, d = 3, 12, 2, 8
  q, k, v = (jnp.asarray(r.standard_normal((b, t, n, d)), jnp.float32) for _ in range(3))
  lengths = np.array([12, 7, 1])  # padded rows, and a row attending one position
  mask = jnp.asarray(np.arange(t)[None, None, None, :] < lengths[:, None, None, None])
  mask = jnp.broadcast_to(mask, (b, 1, t, t))
  bias = jnp.asarray(r.standard_normal((1, n, t, t)), jnp.float32)
  w = jnp.asarray(r.standard_normal((b, t, n, d)), jnp.float32)

  def run(impl):
    def loss(q, k, v, bias):
      ctx = attention.dot_product_attention(
          q, k, v, mask, bias, dropout_rate=dropout,
          dropout_rng=jax.random.key(7) if dropout else None, implementation=impl)
      return jnp.sum(ctx * w), ctx
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    return fn(q, k, v, bias), fn.lower(q, k, v, bias).as_text()

  ((l_x, ctx_x), g_x), text_x = run("xla")
  ((l_b, ctx_b), g_b), text_b = run("gemm")
  assert cpu_matmul.TARGET not in text_x
  # Two forward products and, through their VJPs, four backward ones.
  assert text_b.count(f"@{cpu_matmul.TARGET}(") == 6
  np.testing.assert_allclose(ctx_b, ctx_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_b, l_x, rtol=1e-5, atol=1e-5)
  for got, want in zip(g_b, g_x):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _mesh(**axes):
  names = tuple(axes)
  return AbstractMesh(tuple(axes.values()), names, axis_types=(AxisType.Auto,) * len(names))


def test_auto_picks_gemm_only_where_it_runs():
  resolve = attention.resolve_implementation
  one = _mesh(data=1, fsdp=1)
  # 'auto' prefers the fused kernel (test_cpu_attention.py), built on gemm's.
  assert resolve("auto", jnp.float32, 64, platform="cpu", mesh=one) == "fused"
  assert resolve(None, jnp.float32, 64, platform="cpu", mesh=one) == "fused"
  assert resolve("gemm", jnp.float32, 64, platform="cpu", mesh=one) == "gemm"
  # Another backend, another dtype, or a mesh XLA partitions itself: XLA's products.
  assert resolve("auto", jnp.float32, 64, platform="tpu", mesh=one) == "xla"
  assert resolve("auto", jnp.bfloat16, 64, platform="cpu", mesh=one) == "xla"
  assert resolve("auto", jnp.float32, 64, platform="cpu", mesh=_mesh(data=2)) == "xla"
  assert resolve("gemm", jnp.float32, 64, platform="cpu", mesh=_mesh(data=1, fsdp=2)) == "xla"
  assert resolve("xla", jnp.float32, 64, platform="cpu", mesh=one) == "xla"
  # Inside shard_map (the one-all-reduce step) each device computes its own block.
  manual = AbstractMesh((2,), ("data",), axis_types=(AxisType.Manual,))
  assert resolve("auto", jnp.float32, 64, platform="cpu", mesh=manual) == "fused"
  # The platform defaults to the mesh's: a TPU topology's step compiled on a CPU host.
  assert mesh_platform(one) == jax.default_backend()


def _electra_step(impl: str, remat: str):
  from tests.helpers import custom_calls_in_step
  (calls,), metrics = custom_calls_in_step([cpu_matmul.TARGET], attention_impl=impl,
                                           remat=remat)
  return calls, metrics


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_a_train_step_with_gemm_attention_is_xla_s(remat):
  """The ELECTRA step (scanned layers, attention dropout) with gemm attention gives
  XLA attention's loss and gradient norm. Under dots_saveable the products are kept
  for the backward pass like XLA's dots (6 calls per encoder's layer body: 2 forward,
  4 backward); under full remat the 2 forward ones run again (8)."""
  calls, gemm = _electra_step("gemm", remat)
  none, xla = _electra_step("xla", remat)
  assert none == 0
  assert calls == 2 * (6 if remat == "dots_saveable" else 8)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(gemm[key], xla[key], rtol=1e-5, err_msg=key)


_DEVICES_CHILD = """
import jax, jax.numpy as jnp
from amos_jax.model import attention
assert jax.device_count() == 2
print(attention.resolve_implementation("auto", jnp.float32, 64))
"""


def test_auto_keeps_xla_outside_a_mesh_on_several_devices():
  """Without a mesh in context a program can still be partitioned, by its arguments'
  shardings (embedding over a host's CPU devices): 'auto' must not put a custom call
  XLA cannot split there."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _DEVICES_CHILD], env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split()[-1] == "xla"


def test_a_library_that_did_not_build_falls_back_to_xla_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(cpu_matmul, "unavailable_reason",
                      lambda: "RuntimeError: no C++ compiler (c++) was found")
  rng_lib.warn_once.cache_clear()
  with caplog.at_level("WARNING", logger="amos_jax"):
    assert attention.resolve_implementation(
        "auto", jnp.float32, 64, platform="cpu", mesh=_mesh(data=1)) == "xla"
  assert "did not build" in caplog.text and "no C++ compiler" in caplog.text
  rng_lib.warn_once.cache_clear()
