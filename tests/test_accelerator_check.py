"""benchmarks/accelerator_check.py: its --quick CPU run passes every section and writes its
report; its helpers read every shape of cost analysis; bad data stops it before any work.

The quick run is a fresh process with 2 simulated CPU devices (so the sharded-step check runs
rather than skipping) and the shipped 1000-image sample for the training section. It compiles
about a dozen programs: 99 s (153 s of CPU time) with nothing cached on this 2-core CPU at
load 1.5, 26 s with JAX's persistent compilation cache (the trainer's) warm.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import accelerator_check  # noqa: E402  pylint: disable=wrong-import-position


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def test_quick_run_passes_and_writes_its_report(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data-dir", "sample",
                         "--out", str(tmp_path)], cwd=tmp_path, env=_env(2),
                        capture_output=True, text=True, timeout=2400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads((tmp_path / "accelerator_cpu.json").read_text())
  md = (tmp_path / "accelerator_cpu.md").read_text()
  assert report["ok"] and report["quick"]
  assert report["devices"]["platform"] == "cpu" and report["devices"]["device_count"] == 2
  assert set(report["matmul"]) == {"float32", "bfloat16"}
  assert all(m["flops_per_s"] > 0 for m in report["matmul"].values())

  equiv, shard = report["checks"]
  assert equiv["ok"] and equiv["rel_err"] < 1e-4 and equiv["rel_diff_from_gradient"] > 1e-2
  assert shard["ok"] and not shard.get("skipped") and shard["devices"] == 2
  assert shard["rel_err"] < 1e-4

  rows = report["throughput"]
  assert [(t["model"], t["dtype"]) for t in rows] == [("vgg11", "float32"),
                                                      ("vgg11", "bfloat16")]
  for t in rows:
    assert set(t["optimizers"]) == {"sgd", "scale_amended"}
    for r in t["optimizers"].values():
      assert r["images_per_s"] > 0 and r["gflop_per_step"] > 0
      assert 0 < r["fraction_of_matmul"] < 10  # a finite fraction, from XLA's FLOP count
    assert 0.2 < t["ratio_scale_amended_to_sgd"] < 5

  tr = report["training"]
  assert tr["epochs"] == 1 and len(tr["seconds_per_epoch"]) == 1
  assert tr["seconds_per_epoch"][0] > 0 and math.isfinite(tr["train_loss"][0])
  assert report["data"]["dir"] == "sample"

  for heading in ("## Matmul rate", "## Correctness on the device", "## Training throughput",
                  "Step-time ratio scale-amended / SGD", "## Training run on CIFAR-10",
                  "Verdict: all checks passed."):
    assert heading in md
  assert "**FAIL**" not in md
  assert "accelerator_cpu.md" in proc.stdout
  # Atomic writes leave no temporary files; no machine path in the report.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["accelerator_cpu.json",
                                                        "accelerator_cpu.md"]
  assert str(ROOT) not in json.dumps(report["args"])


def test_missing_data_is_one_error_line_before_any_work(tmp_path):
  missing = tmp_path / "nope"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data-dir", str(missing),
                         "--out", str(tmp_path / "out")], env=_env(1), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-2000:]
  assert "matmul" not in proc.stdout and not (tmp_path / "out").exists()


def test_bad_flags_exit_2():
  with pytest.raises(SystemExit) as e:
    accelerator_check.parse_args(["--dtypes", "float16"])
  assert e.value.code == 2
  with pytest.raises(SystemExit):
    accelerator_check.parse_args(["--models", "vgg12"])


@pytest.mark.parametrize("flags", [["--width", "0"], ["--steps", "-3"], ["--steps", "0"],
                                   ["--reps", "0"], ["--check-width", "-1"],
                                   ["--train-width", "nan"], ["--train-epochs", "0"],
                                   ["--matmul-n", "0"], ["--train-subset", "0"],
                                   ["--budget-s", "0"]])
def test_every_number_is_checked_before_the_device(flags, capsys):
  """A bad number is one line and exit 2 at once, not a traceback after minutes of work."""
  with pytest.raises(SystemExit) as e:
    accelerator_check.parse_args(["--quick", *flags])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{flags[0]} must be" in err, err


def test_every_flag_has_help():
  actions = [a for a in accelerator_check.make_parser()._actions if a.option_strings]
  assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]


def test_flops_of_reads_every_shape_of_cost_analysis():
  assert accelerator_check.flops_of({"flops": 12.0}) == 12.0
  assert accelerator_check.flops_of([{"flops": 3.0}, {"flops": 4.0}]) == 3.0  # older JAX
  for missing in (None, [], {}, {"flops": -1.0}, {"flops": "x"}, object()):
    assert math.isnan(accelerator_check.flops_of(missing))


def test_step_flops_falls_back_to_the_compiled_executable():

  class Compiled:
    def cost_analysis(self):
      return [{"flops": 7.0}]

  class Lowered:
    def cost_analysis(self):
      raise NotImplementedError("no cost analysis before compilation here")

    def compile(self):
      return Compiled()

  assert accelerator_check.step_flops(Lowered()) == 7.0

  class Nothing(Lowered):
    def compile(self):
      raise RuntimeError("backend without cost analysis")

  assert math.isnan(accelerator_check.step_flops(Nothing()))


def test_markdown_marks_a_failed_check():
  report = {
      "quick": False, "total_s": 1.0, "section_s": {"checks": 1.0}, "ok": False,
      "devices": {"platform": "gpu", "kinds": ["H200"], "device_count": 1,
                  "process_count": 1, "memory_gib": [139.8], "versions": {"jax": "0.11.2"},
                  "host": "h: 16 CPU cores", "xla_flags": ""},
      "matmul": {}, "throughput": [{"model": "vgg16", "width": 1.0, "dtype": "bfloat16",
                                    "skipped": "skipped: past --budget-s 420"}],
      "checks": [{"name": "transform == scalar back-matching step", "ok": False,
                  "detail": "relative error 3e-2"},
                 {"name": "sharded step == single-device step", "ok": True, "skipped": True,
                  "detail": "skipped: 1 device"}],
      "training": None}
  md = accelerator_check.markdown(report)
  assert "| transform == scalar back-matching step | **FAIL** |" in md
  assert "| sharded step == single-device step | skipped |" in md
  assert "skipped: past --budget-s 420" in md and "Not run (no `--data-dir`)." in md
  assert "Verdict: A CHECK FAILED." in md
