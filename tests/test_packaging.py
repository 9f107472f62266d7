"""What `pip install .` puts on the path: the library only.

The wheel is built from a copy of the sources (so no stale ``build/`` of an earlier layout can
leak into it) with the test environment's setuptools, offline: ``train/``, ``benchmarks/`` and
``tests/`` are there, as in a checkout, and must stay out of it.
"""

import pathlib
import shutil
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path) -> pathlib.Path:
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(REPO / name, src / name)
  skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "results")
  for name in ("optax_bm", "train", "benchmarks", "tests"):
    shutil.copytree(REPO / name, src / name, ignore=skip)
  out = tmp_path / "dist"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
       "--quiet", "-w", str(out), str(src)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  wheels = list(out.glob("optax_bm-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def test_wheel_holds_only_optax_bm(tmp_path):
  wheel = _build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  top = {n.split("/")[0] for n in names}
  dist_info = {t for t in top if t.endswith(".dist-info")}
  assert len(dist_info) == 1 and top - dist_info == {"optax_bm"}, sorted(top)
  assert {"optax_bm/hessian/__init__.py", "optax_bm/hessian/local.py",
          "optax_bm/hessian/estimators.py", "optax_bm/hessian/comparison.py",
          "optax_bm/hessian/closed_forms.py"} <= set(names)
  # Ranges, not pins: installing it next to a user's newer JAX downgrades nothing.
  requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
              if line.startswith("Requires-Dist:")]
  runtime = [r for r in requires if "extra ==" not in r]
  assert {r.split(">=")[0] for r in runtime} == {"jax", "jaxlib", "flax", "optax", "chex",
                                                "numpy"}, runtime
  assert not [r for r in requires if "==" in r.split(";")[0]], requires
