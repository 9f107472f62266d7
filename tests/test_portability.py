"""Committed files carry no absolute path of the machine that made them (issue 13, item 11).

Data, checkpoints and shared files are recorded by identity and by a path relative to the
repository (``train/sample``, ``../shared/data/...``); tests find shared data as ``../shared``.
"""

import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Home and work directories of any machine (a user's ``~/data`` is written with the tilde).
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|root|home|Users|mnt|scratch)/[\w.-]+")
# A temporary directory is a machine path too in a result or a run's config.
TMP_PATH = re.compile(r"(?<![\w.~$-])/tmp/[\w.-]+")


def _tracked_files():
  if shutil.which("git") is None or not (REPO / ".git").exists():
    pytest.skip(f"not a git checkout (no {REPO / '.git'}): cannot list the tracked files")
  out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
  return [REPO / name for name in out.stdout.decode().split("\0") if name]


def test_no_absolute_machine_paths_in_tracked_files():
  here = {str(REPO), str(REPO.parent / "shared")}
  offenders = []
  for path in _tracked_files():
    if not path.is_file():
      continue  # deleted in the work tree, not yet committed
    blob = path.read_bytes()
    if b"\0" in blob[:8192]:
      continue  # binary (PNG, archives)
    text = blob.decode("utf-8", errors="replace")
    rel = path.relative_to(REPO).as_posix()
    found = set(MACHINE_PATH.findall(text)) | {p for p in here if p in text}
    if rel.startswith("train/results/") or rel.endswith((".json", ".jsonl")):
      found |= set(TMP_PATH.findall(text))
    offenders += [f"{rel}: {p}" for p in sorted(found)]
  assert not offenders, ("absolute paths of a machine in tracked files (record a path relative "
                         "to the repository, ../shared/..., or an identity instead):\n"
                         + "\n".join(offenders))


def test_reports_and_data_lines_name_no_machine_paths(tmp_path):
  from train import data, local_hessian
  argv = ["--out", "train/results/local_hessian", "--part", "vgg", "--checkpoint",
          str(tmp_path / "run_sgd"), f"--checkpoint={REPO / 'runs' / 'sa'}", "--data-dir",
          str(REPO.parent / "shared" / "data" / "cifar10")]
  cmd = local_hessian.report_command(argv, local_hessian.parse_args(argv))
  assert cmd.endswith("--checkpoint RUN1 --checkpoint runs/sa --data-dir ../shared/data/cifar10")
  assert str(tmp_path) not in cmd
  assert data.load_cifar("cifar10", "sample").source.startswith(
      "cifar10 from train/sample/cifar-10-python.tar.gz (")
  assert data.portable_path(REPO.parent / "shared" / "x") == "../shared/x"
  assert data.portable_path(REPO.parent / "data" / "cifar-100-python") == "../data/cifar-100-python"
  assert data.resolve_path("../shared/x") == REPO.parent / "shared" / "x"
  assert data.portable_path(tmp_path) == tmp_path.as_posix()  # outside: left as given
