"""The choice between XLA's form and a native CPU custom call, one rule for every
`model.*_impl` key with 'auto' | 'xla' | 'native' (`native_lib.resolve`).

'auto' and 'native' run the custom call on the CPU in float32 where XLA does not
partition the program (one device, or inside the one-all-reduce step's shard_map)
and the library is built; elsewhere XLA's form runs, silently for 'auto' where the
kernel does not apply by design, with one warning naming the key for an explicit
'native' that cannot run or a library that did not build. An unknown value is a
ValueError naming the key.
"""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from amos_jax.model import cpu_gelu, cpu_layer_norm, native_lib
from amos_jax.model import rng as rng_lib


def _dropout(implementation, dtype, platform, mesh):
  del dtype  # masks have none
  return rng_lib.resolve_dropout_impl(implementation, jax.random.key(0), platform, mesh)


# key -> (resolver(implementation, dtype, platform, mesh), whether dtype matters)
RESOLVERS = {"model.dropout_impl": (_dropout, False),
             "model.layer_norm_impl": (cpu_layer_norm.resolve_layer_norm_impl, True),
             "model.gelu_impl": (cpu_gelu.resolve_gelu_impl, True)}


def _mesh(**axes):
  names = tuple(axes)
  return AbstractMesh(tuple(axes.values()), names, axis_types=(AxisType.Auto,) * len(names))


@pytest.fixture(autouse=True)
def _fresh_warnings():
  rng_lib.warn_once.cache_clear()
  yield
  rng_lib.warn_once.cache_clear()


@pytest.mark.parametrize("key", list(RESOLVERS))
def test_auto_picks_native_only_where_it_runs(key, caplog):
  resolve, typed = RESOLVERS[key]
  one, f32 = _mesh(data=1, fsdp=1), jnp.float32
  for implementation in ("auto", None, "native"):
    assert resolve(implementation, f32, "cpu", one) == "native"
  manual = AbstractMesh((2,), ("data",), axis_types=(AxisType.Manual,))
  assert resolve("auto", f32, "cpu", manual) == "native"
  with caplog.at_level("WARNING", logger="amos_jax"):
    assert resolve("xla", f32, "cpu", one) == "xla"
    assert resolve("auto", f32, "tpu", one) == "xla"
    assert resolve("auto", f32, "cpu", _mesh(data=2)) == "xla"
    if typed:
      assert resolve("auto", jnp.bfloat16, "cpu", one) == "xla"
  assert not caplog.text  # 'auto' is silent where the kernel does not apply by design
  with caplog.at_level("WARNING", logger="amos_jax"):
    assert resolve("native", f32, "tpu", one) == "xla"
  assert f"{key}=native" in caplog.text and "tpu" in caplog.text
  if typed:
    with caplog.at_level("WARNING", logger="amos_jax"):
      assert resolve("native", jnp.bfloat16, "cpu", one) == "xla"
    assert "bfloat16" in caplog.text
  with pytest.raises(ValueError, match=f"{key.split('.')[1]}='fast'"):
    resolve("fast", f32, "cpu", one)


@pytest.mark.parametrize("key", list(RESOLVERS))
def test_a_library_that_did_not_build_falls_back_to_xla_with_a_warning(
    key, monkeypatch, caplog):
  monkeypatch.setattr(native_lib, "unavailable_reason",
                      lambda: "RuntimeError: no C++ compiler (c++) was found")
  with caplog.at_level("WARNING", logger="amos_jax"):
    assert RESOLVERS[key][0]("auto", jnp.float32, "cpu", _mesh(data=1)) == "xla"
  assert "did not build" in caplog.text and "no C++ compiler" in caplog.text
  assert f"{key}=auto" in caplog.text
