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


@pytest.fixture(scope="module")
def runs():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = {script: subprocess.Popen(
      [sys.executable, str(ROOT / "benchmarks" / script), *COMMON, *args], cwd=ROOT, env=env,
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
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out_md = tmp_path / "pool.md"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "max_pool.py"), "--models", "vgg11",
       "--widths", "1/16", "--batch", "8", "--reps", "1", "--sample-seconds", "0", "--out",
       str(out_md)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = out_md.read_text()
  assert "## The pool alone" in text and "| 1/16 | (8, 32, 32, 4) |" in text
  assert "| vgg11 | 1/16 |" in text and str(ROOT) not in text
  bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "max_pool.py"), "--models",
                        "vgg12"], cwd=ROOT, env=env, capture_output=True, text=True)
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
