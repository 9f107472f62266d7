"""Smoke tests: both benchmarks run with --quick at a tiny width, exit 0 and print their tables
(throughput with its profile).

Both scripts start together in fresh processes (XLA compiles mostly on one core, so the pair
takes about as long as the slower one, about a minute on an idle 2-core CPU), without the
4 simulated devices of conftest.py (a benchmark measures one device), with the fewest
repetitions and samples of one call.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ("--quick", "--width", "0.0625", "--sample-seconds", "0")
RUNS = {
    "optimizer_overhead.py": ("--update-width", "0.0625", "--models", "vgg11",
                              "--optimizers", "sgd,scale_amended", "--reps", "2",
                              "--step-reps", "2"),
    "throughput.py": ("--models", "vgg11", "--reps", "2", "--matmul-n", "512", "--profile"),
}


def _cpu_env() -> dict:
  """A benchmark measures one CPU device: no conftest XLA_FLAGS (4 simulated devices)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                        env=_cpu_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs():
  procs = {script: subprocess.Popen(
      [sys.executable, str(ROOT / "benchmarks" / script), *COMMON, *args], cwd=ROOT, env=_cpu_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for script, args in RUNS.items()}
  yield procs
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()


def _output(runs, script):
  proc = runs[script]
  try:
    out, err = proc.communicate(timeout=900)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{err[-4000:]}"
  return out


def test_optimizer_overhead_quick(runs):
  out = _output(runs, "optimizer_overhead.py")
  assert "machine:" in out and "load average" in out
  assert "### Optimizer update alone" in out and "### Whole training step" in out
  assert "| optax_bm.scale_amended_sgd |" in out
  assert "| vgg11 | optax_bm.scale_amended_sgd |" in out
  assert "width 0.0625 (NOT full width)" in out
  assert "XLA_FLAGS='--xla_cpu_enable_concurrency_optimized_scheduler=false'" in out


def test_throughput_quick(runs):
  out = _output(runs, "throughput.py")
  assert "machine:" in out and "load average" in out
  assert "### Training step throughput and utilization" in out
  assert "### On-device data path" in out
  assert "| vgg11 | 0.0625 | float32 |" in out
  assert "augment + normalize" in out
  assert "XLA_FLAGS='--xla_cpu_enable_concurrency_optimized_scheduler=false'" in out
  # The profile's breakdown finds the step's three kinds of convolution, and no swapped ones.
  assert "traced op time by kind" in out
  for kind in ("conv, forward", "conv, input gradient", "conv, weight gradient"):
    assert f"| {kind} |" in out, kind
  assert "| conv, no op name |" not in out  # every convolution's JAX op name was found
  assert "0 operand-swapped convolutions took 0 ms" in out


def test_max_pool_benchmark_tiny(tmp_path):
  out_md = tmp_path / "pool.md"
  proc = _run_benchmark("max_pool.py", "--models", "vgg11", "--widths", "1/16", "--batch", "8",
                        "--reps", "1", "--sample-seconds", "0", "--out", str(out_md))
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = out_md.read_text()
  assert "## The pool alone" in text and "| 1/16 | (8, 32, 32, 4) |" in text
  assert "| vgg11 | 1/16 |" in text and str(ROOT) not in text
  bad = _run_benchmark("max_pool.py", "--models", "vgg12")
  assert bad.returncode == 2 and "unknown VGG 'vgg12'" in bad.stderr


def test_xla_flags_benchmark_reports_every_flag_even_a_failing_one(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out_md = tmp_path / "flags.md"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "xla_flags.py"), "--width", "1/16", "--batch",
       "8", "--rounds", "1", "--samples", "1", "--calls", "1", "--flags=--xla_bogus_flag=1",
       "--out", str(out_md)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = out_md.read_text()
  assert "| (none: the baseline) |" in text and "| 1.000 |" in text
  assert "| `--xla_bogus_flag=1` | — | — | — (failed: " in text and "Unknown flag" in text


def test_hand_written_batchnorm_vjp_equals_flax_batchnorm_relu():
  """benchmarks/batchnorm_vjp.py's bn_relu: values, batch statistics and gradients (input,
  scale, offset) equal Flax's training-mode BatchNorm followed by ReLU."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from benchmarks import batchnorm_vjp

  kx, ks, kb, kw = jax.random.split(jax.random.key(0), 4)
  x = 2.0 * jax.random.normal(kx, (6, 5, 5, 3)) + 0.5
  scale = 1.0 + 0.3 * jax.random.normal(ks, (3,))
  bias = 0.2 * jax.random.normal(kb, (3,))
  w = jax.random.normal(kw, x.shape)  # a loss that weighs every output differently

  def flax_bn(x, scale, bias):
    bn = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-5, use_running_average=False,
                       rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = scale, bias
    y = nnx.relu(bn(x))
    # Flax stores m·old + (1-m)·batch; with old mean 0 and old var 1 the batch's are recovered.
    return y, bn.mean[...] / 0.1, (bn.var[...] - 0.9) / 0.1

  hand = batchnorm_vjp.bn_relu_fn(1e-5)
  for a, b in zip(flax_bn(x, scale, bias), hand(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  loss = lambda f: lambda *args: jnp.sum(w * f(*args)[0])
  g_flax = jax.grad(loss(flax_bn), argnums=(0, 1, 2))(x, scale, bias)
  g_hand = jax.grad(loss(hand), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(g_flax, g_hand):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batchnorm_vjp_benchmark_tiny(tmp_path):
  out_md = tmp_path / "bn.md"
  proc = _run_benchmark("batchnorm_vjp.py", "--models", "vgg11", "--widths", "1/16", "--batch",
                        "8", "--repeats", "1", "--sample-seconds", "0", "--check-steps", "2",
                        "--out", str(out_md))
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = out_md.read_text()
  row = next(line for line in text.splitlines() if line.startswith("| vgg11 | 1/16 |"))
  # The trainer's step with either hand-written derivative trains as Flax's does.
  header = next(line for line in text.splitlines() if line.startswith("| model |"))
  col = [c.strip() for c in header.split("|")].index("max rel. difference, vjp / jvp")
  diffs = [float(d) for d in row.split("|")[col].split("/")]
  assert len(diffs) == 2 and max(diffs) < 1e-4, row
  assert str(ROOT) not in text
  bad = _run_benchmark("batchnorm_vjp.py", "--models", "resnet20")
  assert bad.returncode == 2 and "VGG names only" in bad.stderr
