"""Smoke tests: both benchmarks run with --quick at a tiny width, exit 0 and print their tables.

Each runs in a fresh process without the 4 simulated devices of conftest.py (a benchmark
measures one device), with the fewest repetitions and samples of one call; about 20-30 s each
on a 2-core CPU.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--width", "0.0625",
       "--sample-seconds", "0", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
  return proc.stdout


def test_optimizer_overhead_quick():
  out = _run("optimizer_overhead.py", "--update-width", "0.0625", "--models", "vgg11",
             "--optimizers", "sgd,scale_amended", "--reps", "2", "--step-reps", "2")
  assert "machine:" in out and "load average" in out
  assert "### Optimizer update alone" in out and "### Whole training step" in out
  assert "| optax_bm.scale_amended_sgd |" in out
  assert "| vgg11 | optax_bm.scale_amended_sgd |" in out
  assert "width 0.0625 (NOT full width)" in out


def test_throughput_quick():
  out = _run("throughput.py", "--models", "vgg11", "--reps", "2", "--matmul-n", "512")
  assert "machine:" in out and "load average" in out
  assert "### Training step throughput and utilization" in out
  assert "### On-device data path" in out
  assert "| vgg11 | 0.0625 | float32 |" in out
  assert "augment + normalize" in out
