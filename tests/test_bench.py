"""amos-bench: runs on a tiny config (table and JSON), and its analytic FLOP count
agrees with XLA's count of the same step within a sane factor for every objective."""
import json
import os

import pytest

from amos_jax import config as config_lib
from amos_jax.objectives import get_objective
from amos_jax.train import bench
from amos_jax.train.loop import compile_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--config.model.num_layers=2", "--config.model.hidden_size=32",
        "--config.model.num_heads=2", "--config.model.intermediate_size=64",
        "--config.model.embedding_size=32", "--config.model.vocab_size=512",
        "--config.train.batch_size=4", "--config.train.seq_len=32",
        "--config.train.rng_impl=rbg")


BENCH_ARGS = ("--config", f"{ROOT}/configs/electra.py:tiny", *TINY, "--windows", "2",
              "--window_steps", "2", "--matmul_size", "128")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """(table, JSON) of amos-bench on the tiny config, in this process."""
  import contextlib
  import io
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  table = io.StringIO()
  with contextlib.redirect_stdout(table):
    assert bench.main([*BENCH_ARGS, "--json", str(out)]) == 0
  return table.getvalue(), json.loads(out.read_text())


def test_amos_bench_runs_on_a_tiny_config(one_process):
  table, r = one_process
  for row in ("compilation", "state init", "step time (median)", "tokens/s",
              "MFU vs measured matmul"):
    assert row in table
  assert r["compile_seconds"] > 0 and r["lower_seconds"] > 0 and r["init_seconds"] > 0
  assert len(r["step_times"]) == 2 and r["step_seconds_median"] > 0
  assert len(r["matmul_peak_windows"]) == 2
  assert r["matmul_peak_flops"] == max(r["matmul_peak_windows"])
  assert r["tokens_per_second"] == pytest.approx(4 * 32 / r["step_seconds_median"])
  assert 0 < r["mfu_vs_measured_matmul"] < 1.5
  assert 0.7 < r["xla_flops_per_step"] / r["model_flops_per_step"] < 2.0
  # float32 on one CPU device: 'auto' attention runs in our CPU kernels, which the
  # table says (with TINY's rbg keys the gemm products: the fused kernel hashes
  # threefry's); XLA's FLOP count is of the same step with XLA's attention.
  assert r["attention_products"].startswith("gemm (") and "attention products" in table
  # With rbg keys (TINY) dropout's masks are XLA's: the native ones hash threefry's.
  assert r["dropout_masks"] == "XLA" and "dropout masks" in table
  # LayerNorm and GELU's backward pass in float32 on one CPU device: the custom calls.
  assert r["layer_norm"].startswith("native (") and "layer norm" in table
  assert r["gelu_backward"].startswith("native (") and "GELU backward" in table


@pytest.mark.parametrize("name", ["mlm", "amos"])
def test_analytic_flops_match_xla_within_a_sane_factor(name):
  """The lowered step (no compile) with the layers unrolled: XLA counts every
  operation (element-wise ones and the optimizer too), the analytic count only the
  matrix products, so XLA's is somewhat larger, never several times."""
  config = config_lib.load_config_file(f"{ROOT}/configs/{name}.py:tiny")
  config_lib.apply_overrides(config, [(a[9:].split("=")[0], a.split("=")[1]) for a in TINY])
  config.model.scan_layers = False
  if name == "amos":
    config.objective.generator.tap_layers = (1, 2)
  config = config_lib.freeze(config)
  analytic = get_objective(config).model_flops(4, 32)
  xla = compile_train_step(config, lower_only=True)["xla_flops"]
  assert 0.7 < xla / analytic["total"] < 2.0, (xla, analytic)


def test_hlo_dots_counts_each_product_through_the_layer_loop():
  """The dot inventory behind benchmarks/matmul_floor.py: a 5-step scan and its
  backward pass hold 3 products per step (forward, input and weight gradients);
  their FLOPs, times the loops' trip counts, must add up to the exact total."""
  import jax
  import jax.numpy as jnp

  def loss(x, ws):
    def body(h, w):
      return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(body, x, ws)
    return jnp.sum(h)

  x, ws = jnp.ones((64, 128)), jnp.ones((5, 128, 128)) * 0.01
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile().as_text()
  assert "while(" in text  # the loop is still a loop, so trip counts matter
  dots = bench.hlo_dots(text)
  assert sum(d.count for d in dots) == 15
  assert sum(d.flops * d.count for d in dots) == 15 * 2 * 64 * 128 * 128
  with pytest.raises(ValueError, match="trip count"):
    bench.hlo_dots(text.replace('"known_trip_count"', '"unknown"'))


_BENCH_ON_HOST_DEVICES = """
import sys
from amos_jax.train import bench
# Known peaks, one per window: the table divides by the best of them.
peaks = iter([0.5e9, 1e9, 0.25e9])
bench.matmul_peak = lambda dtype, size: next(peaks)
bench.main(sys.argv[1:])
"""


def test_cpu_host_devices_share_one_matmul_peak(tmp_path):
  """Split into two CPU devices (amos_jax/hostcpu.py), the step runs on both, but they
  share the host's cores: the MFU is against one host's peak, not two devices'. The
  peak is measured after each window and the best one divides."""
  import subprocess
  import sys
  out = tmp_path / "bench.json"
  from tests.train_helpers import env_for_host
  r = subprocess.run([sys.executable, "-c", _BENCH_ON_HOST_DEVICES, "--config",
                      f"{ROOT}/configs/electra.py:tiny", *TINY, "--windows", "3",
                      "--window_steps", "1", "--json", str(out)],
                     env=env_for_host("2"), capture_output=True, text=True, timeout=300,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 2
  assert result["matmul_peak_windows"] == [0.5e9, 1e9, 0.25e9]
  assert result["matmul_peak_flops"] == 1e9
  assert result["mfu_vs_measured_matmul"] == pytest.approx(
      result["model_flops_per_step"] / result["step_seconds_median"] / 1e9)


def test_amos_bench_as_processes_steps_the_same_batch(tmp_path, one_process):
  """AMOS_JAX_CPU_PROCESSES=2: amos-bench starts two data-parallel processes
  (amos_jax/hostcpu.py), each with half the rows of the same global batch: the
  first loss is the one process's; the peak is both processes', measured at once;
  process 0 alone reports."""
  import subprocess
  import sys
  from tests.train_helpers import env_for
  out = tmp_path / "bench.json"
  r = subprocess.run([sys.executable, "-c", bench._CHILD, *BENCH_ARGS, "--json", str(out)],
                     env=dict(env_for(1), AMOS_JAX_CPU_PROCESSES="2"), capture_output=True,
                     text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("MFU vs measured matmul") == 1, r.stdout
  assert "2 x cpu (cpu), 2 processes" in r.stdout
  two, one = json.loads(out.read_text()), one_process[1]
  assert (two["processes"], two["devices"], one["processes"]) == (2, 2, 1)
  assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
  assert len(two["matmul_peak_per_process"]) == 2
  assert two["matmul_peak_flops"] == pytest.approx(sum(two["matmul_peak_per_process"]))
  assert two["mfu_vs_measured_matmul"] == pytest.approx(
      two["model_flops_per_step"] / two["step_seconds_median"] / two["matmul_peak_flops"])
  # The whole step's FLOPs, although each process's program is per device.
  assert two["xla_flops_per_step"] == pytest.approx(one["xla_flops_per_step"], rel=0.01)
  assert "one flat all-reduce per step over 2 devices" in r.stderr
  assert "process 0 compiles for all 2 processes" in r.stderr


def test_step_profile_splits_wall_time_among_running_kernels():
  """benchmarks/step_profile.py's attribution: overlapping kernels share their
  moments equally, a moment with none running goes to the kernel that ended last
  (an Eigen product runs after its launch event), and it all adds up to the span."""
  from amos_jax.train.step_profile import attribute, hlo_index, kind
  events = [(0.0, 4.0, "a.1"), (2.0, 6.0, "b.2"), (8.0, 10.0, "c.3"), (8.5, 9.0, "c.4")]
  wall = attribute(events)
  assert wall == pytest.approx({"a.1": 3.0, "b.2": 5.0, "c.3": 1.75, "c.4": 0.25})
  assert sum(wall.values()) == pytest.approx(10.0)
  assert kind("ynn_fusion.12") == "ynn_fusion" and kind("copy") == "copy"
  text = ("HloModule m\n\nbody.3 {\n  %p = f32[4]{0} parameter(0)\n"
          "  ROOT %dot.1 = f32[4,4]{1,0} dot(%p, %p), metadata={op_name=\"jit(f)/dot\"}\n}\n\n"
          "ENTRY %main.9 {\n  ROOT %w = f32[4]{0} while(%x), body=%body.3\n}\n")
  index = hlo_index(text)
  assert index["dot.1"] == ("f32[4,4]{1,0}", "jit(f)/dot", "body.3")
  assert index["w"][2] == "main.9"


def test_attention_core_benchmark_times_every_form():
  """benchmarks/attention_core.py runs (tiny sizes): each mask shape and each
  attention form gets a time."""
  import subprocess
  import sys
  r = subprocess.run(
      [sys.executable, f"{ROOT}/benchmarks/attention_core.py", "--batch", "2", "--seq",
       "16", "--heads", "2", "--head_dim", "8", "--rounds", "2"],
      capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout
  assert out.count("x\n") == 4, out  # four mask shapes, each with its ratio
  for impl in ("xla", "gemm", "fused"):
    assert f"{impl} forward+backward" in out and f"{impl} forward " in out, out


def test_layer_norm_benchmark_times_both_forms():
  """benchmarks/layer_norm_core.py runs (tiny sizes): both widths, both passes, each
  with XLA's and the native time and their ratio."""
  import subprocess
  import sys
  r = subprocess.run(
      [sys.executable, f"{ROOT}/benchmarks/layer_norm_core.py", "--batch", "2", "--seq",
       "8", "--rounds", "2"],
      capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line for line in r.stdout.splitlines() if line.rstrip().endswith("x")]
  assert len(rows) == 4, r.stdout  # (2, 8, 256) and (2, 8, 64), forward and both passes
  assert sum("forward+backward" in row for row in rows) == 2, r.stdout
