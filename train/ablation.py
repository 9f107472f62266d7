"""Does scale-amended SGD beat SGD? The ablation of the paper's open points
(docs/method.md §6) on the full CIFAR-10, and the
learning-rate screen on the full CIFAR-100 (``--dataset cifar100``).

Each run is ``train/cifar.py`` in a subprocess with its own work directory (so the grid resumes
where it stopped: finished or diverged runs are skipped, interrupted ones resume from their
last checkpoint), with a 5,000-image validation split held out from the training set
(``--val-split``) and per-block logging (``--log-blocks``). Choices are made on the
validation split; the test split is only reported.

Phases:

* ``screen``: VGG11-BN width 1/8, 10 epochs, step decay, batch 128, seed 0; SGD and every
  scale-amended reading over the same learning-rate sweep (0.01, 0.03, 0.1, 0.3), LARS over
  (1, 2, 4); a reading whose best learning rate is at an end of its sweep gets the next one
  beyond it (0.003 below 0.01, 1 above 0.3), so that every best is inside its sweep.
* ``confirm``: the finalists (``--finalists READING@LR ...``, chosen on validation from the
  screen) with 3 seeds at 30 epochs.

After every finished run its ``config.json`` and ``metrics.jsonl`` are copied to
``train/results/ablation_cifar10/runs/`` and ``ablation.md``, ``curves.png`` and
``blocks.png`` are regenerated from all finished runs (``--git-commit`` also commits them).

``--dataset cifar100`` runs the same protocol on CIFAR-100 with VGG13-BN width 1/8 (the
model of Table 1 at CPU scale) for SGD, the default scale-amended reading, LARS and LSALR (LSALR
over 0.03, 0.1, 0.3); results go to ``train/results/ablation_cifar100/``. Its data is the
official ``cifar-100-python`` directory, by default ``../data/cifar-100-python`` beside the
repository (rebuilt by ``../shared/data/cifar100/rebuild.py``; never committed), or
``--data-dir``.

``--model resnet20`` runs it for ResNet-20 (width 1/4) on CIFAR-10: SGD with He et al.'s weight
decay and scale-amended SGD under each reading of a residual unit's input scale
(docs/method.md §7); results go to ``train/results/ablation_cifar10_resnet20/``.

Examples::

  python train/ablation.py --phase screen --jobs 2
  python train/ablation.py --phase confirm --finalists sgd@0.1 sa_unscaled@0.03 --jobs 2
  python train/ablation.py --report-only --readme   # tables -> ablation.md and docs/results.md
  python train/ablation.py --dataset cifar100 --phase screen --jobs 1 --git-commit
  python train/ablation.py --model resnet20 --phase screen --jobs 2
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (python train/ablation.py): `train` is a package
  sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
from train import ablation_report
# The run records and the protocol's constants live with the report; re-exported here.
from train.ablation_report import (BATCH, CONFIRM_EPOCHS, SCREEN_EPOCHS, VAL_SPLIT, WIDTH, Run,
                                   best_lrs, read_metrics, status)
# pylint: enable=wrong-import-position

CIFAR_PY = REPO / "train" / "cifar.py"
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10" / "cifar-10-batches-py"
OUT = REPO / "train" / "results" / "ablation_cifar10"
WORKDIRS = REPO / "workdirs" / "ablation_cifar10"
MODEL = "vgg11"

# Readings of the open points, docs/method.md §6 (trainer flags). "sa_unscaled" is the base the single-point variations
# start from: SPEC v1 with bias/BatchNorm left at plain SGD, the library's default (chosen on
# this ablation's validation results).
_SA_BASE = {"pooling": "before", "others": "unscaled", "gamma": "ignored", "decay": "before"}


def _sa(label: str, **changes) -> tuple:
  """A scale-amended reading: the base with ``changes``, as (label, trainer flags)."""
  flags = ["--optimizer", "scale_amended"]
  for key, value in {**_SA_BASE, **changes}.items():
    flags += [f"--sa-{key}", value]
  return label, flags


READINGS = {
    "sgd": ("SGD (wd 1e-3)", ["--optimizer", "sgd"]),
    "lars": ("LARS (wd 1e-3, trust 1e-3)", ["--optimizer", "lars"]),
    "sa_v1": _sa("SA: SPEC v1 (bias/BN scaled)", others="scaled"),
    "sa_unscaled": _sa("SA: bias/BN unscaled (the default)"),
    "sa_pool_after": _sa("SA: unscaled + authors' pooling", pooling="after"),
    "sa_pool_effective": _sa("SA: unscaled + effective positions", pooling="effective"),
    "sa_gamma": _sa("SA: unscaled + gamma^2-aware", gamma="aware"),
    "sa_decay_after": _sa("SA: unscaled + decay after scaling", decay="after"),
}
LSALR = ("LSALR (wd 1e-3)", ["--optimizer", "lsalr"])
# ResNets (docs/method.md §7): He et al.'s SGD, and scale-amended SGD under each reading of a
# residual unit's input scale (the library's two).
RESNET_READINGS = {
    "sgd_he": ("SGD (wd 1e-4, He et al.)", ["--optimizer", "sgd"]),
    "sa_propagated": _sa("SA: input scale propagated", **{"input-scale": "propagated"}),
    "sa_unit": _sa("SA: input scale 1 (the default)", **{"input-scale": "unit"}),
    # Added after the lr-0.1 runs' local Hessians (train/results/local_hessian/
    # resnet_trained.md): scale-amended training shrinks the branches' BatchNorm γ, which the
    # propagated scalars ignore unless γ²-aware.
    "sa_propagated_gamma": _sa("SA: input scale propagated, γ²-aware", gamma="aware",
                               **{"input-scale": "propagated"}),
}
LRS = (0.1, 0.03, 0.3, 0.01)  # run in this order: the most informative first
LARS_LRS = (2.0, 1.0, 4.0)
LSALR_LRS = (0.1, 0.03, 0.3)
# Where a sweep is extended when its best learning rate is at one of its ends.
LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LARS_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
CONFIRM_SEEDS = (0, 1, 2)


TITLE = "Full CIFAR-10, VGG11-BN"  # figures and tables


class Study(NamedTuple):
  """One study's ablation: what :func:`use_study` puts into this module's globals."""
  dataset: str
  model: str
  title: str
  data_dir: pathlib.Path
  readings: tuple
  width: float = WIDTH


STUDIES = {
    "cifar10": Study("cifar10", "vgg11", "Full CIFAR-10, VGG11-BN", DATA_DIR, tuple(READINGS)),
    "cifar100": Study("cifar100", "vgg13", "Full CIFAR-100, VGG13-BN",
                      REPO.parent / "data" / "cifar-100-python",
                      ("sgd", "sa_unscaled", "lars", "lsalr")),
    # Width 1/4 (4-8-16 channels): the widest whose screen and 3-seed confirmation fit in a
    # few hours on 2 CPU cores (an epoch about 40 s; width 1/2 about 75 s).
    "cifar10-resnet20": Study("cifar10", "resnet20", "Full CIFAR-10, ResNet-20", DATA_DIR,
                              tuple(RESNET_READINGS), width=0.25),
}
_ALL_READINGS = {**READINGS, "lsalr": LSALR, **RESNET_READINGS}


def use_study(name: str, data_dir: Optional[str] = None) -> Study:
  """Points the module's globals (data, model, width, readings, output and work directories)
  at one study of :data:`STUDIES`; CIFAR-10's VGG11 is the default at import."""
  global DATA_DIR, OUT, WORKDIRS, MODEL, READINGS, TITLE, DATASET, WIDTH, STUDY  # pylint: disable=global-statement
  study = STUDIES[name]
  STUDY, DATASET, MODEL, TITLE, WIDTH = name, study.dataset, study.model, study.title, study.width
  DATA_DIR = pathlib.Path(data_dir).resolve() if data_dir else study.data_dir
  OUT = REPO / "train" / "results" / f"ablation_{name.replace('-', '_')}"
  WORKDIRS = REPO / "workdirs" / f"ablation_{name.replace('-', '_')}"
  READINGS = {r: _ALL_READINGS[r] for r in study.readings}
  return study


STUDY, DATASET = "cifar10", "cifar10"


def sweep(reading: str) -> tuple:
  """The screen's base learning rates of ``reading``, in the order they run."""
  return {"lars": LARS_LRS, "lsalr": LSALR_LRS}.get(reading, LRS)


def screen_runs(rows=None) -> list:
  """The screen's runs; with ``rows`` (finished runs, :func:`collect`) also its extensions:
  a reading whose best learning rate on validation is the lowest (highest) it has tried, once
  that includes its base sweep's lowest (highest), gets the next one below (above) on
  ``LADDER`` (``LARS_LADDER``), until its best is inside what it has tried."""
  runs = []
  for i in range(max(len(sweep(r)) for r in READINGS)):
    for reading in READINGS:
      lrs = sweep(reading)
      if i < len(lrs):
        runs.append(Run(reading, lrs[i], SCREEN_EPOCHS, 0))
  for reading, (lr, _) in best_lrs(rows or [], SCREEN_EPOCHS).items():
    ladder = LARS_LADDER if reading == "lars" else LADDER
    base = sweep(reading)
    done = {r.lr for r, _, st in rows if r.reading == reading and r.epochs == SCREEN_EPOCHS
            and r.seed == 0 and st in ("finished", "diverged")}
    if lr not in ladder or len(done) < 2:
      continue
    i = ladder.index(lr)
    # Beyond an end only once the base sweep's end has been run and is still the best.
    if lr == min(done) and min(base) in done and i > 0:
      runs.append(Run(reading, ladder[i - 1], SCREEN_EPOCHS, 0))
    elif lr == max(done) and max(base) in done and i + 1 < len(ladder):
      runs.append(Run(reading, ladder[i + 1], SCREEN_EPOCHS, 0))
  return runs


def confirm_runs(finalists) -> list:
  runs = []
  for seed in CONFIRM_SEEDS:
    for f in finalists:
      reading, _, lr = f.partition("@")
      if reading not in READINGS or not lr:
        raise SystemExit(f"error: --finalists {f!r}: expected READING@LR with READING one of "
                         f"{', '.join(READINGS)}")
      runs.append(Run(reading, float(lr), CONFIRM_EPOCHS, seed))
  return runs


def command(run: Run) -> list:
  return [sys.executable, str(CIFAR_PY), "--dataset", DATASET,
          "--data-dir", os.path.relpath(DATA_DIR, REPO), "--model", MODEL, "--width", f"{WIDTH:g}", "--batch-size", str(BATCH),
          "--epochs", str(run.epochs), "--lr", f"{run.lr:g}", "--seed", str(run.seed),
          "--val-split", str(VAL_SPLIT), "--log-blocks", "--no-progress",
          *READINGS[run.reading][1], "--workdir", os.path.relpath(WORKDIRS / run.name, REPO)]


def _commit(paths, message: str) -> None:
  for _ in range(10):  # other agents may hold the index lock for a moment
    add = subprocess.run(["git", "add", "--", *paths], cwd=REPO, capture_output=True)
    done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=REPO,
                          capture_output=True, text=True)
    if add.returncode == 0 and (done.returncode == 0 or "nothing" in done.stdout + done.stderr):
      return
    time.sleep(3)
  print(f"warning: could not commit {message!r}: {done.stderr.strip()}", flush=True)


def execute(run: Run, git_commit: bool) -> str:
  workdir = WORKDIRS / run.name
  # A finished run is known from its committed record too: workdirs/ is git-ignored and does
  # not survive into a fresh checkout, runs/ does.
  for metrics in (workdir / "metrics.jsonl", OUT / "runs" / f"{run.name}.metrics.jsonl"):
    st = status(read_metrics(metrics), run.epochs)
    if st in ("finished", "diverged"):
      return st
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "log.txt", "a") as log:
    rc = subprocess.run(command(run), cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  st = status(read_metrics(workdir / "metrics.jsonl"), run.epochs)
  print(f"{run.name}: {st} (exit {rc})", flush=True)
  if st in ("finished", "diverged"):
    report()
    if git_commit:
      _commit([str(OUT.relative_to(REPO))], f"{OUT.name}: {run.name} {st}")
  return st


def sync_results() -> None:
  """Copies config.json and metrics.jsonl of every finished or diverged run into ``runs/``."""
  OUT.joinpath("runs").mkdir(parents=True, exist_ok=True)
  for workdir in sorted(WORKDIRS.glob("*-lr*-e*-s*")):
    epochs = int(workdir.name.rsplit("-", 2)[1][1:])
    if status(read_metrics(workdir / "metrics.jsonl"), epochs) not in ("finished", "diverged"):
      continue
    for f in ("config.json", "metrics.jsonl"):
      dst = OUT / "runs" / f"{workdir.name}.{f}"
      if dst.exists() and dst.read_bytes() == (workdir / f).read_bytes():
        continue
      tmp = OUT / "runs" / f".{workdir.name}.{f}.tmp"
      shutil.copyfile(workdir / f, tmp)
      os.replace(tmp, dst)


# --------------------------------------------------------------------------------------------
# Report (train/ablation_report.py), for the current study


def collect() -> list:
  """The current study's recorded runs (:func:`train.ablation_report.collect`)."""
  return ablation_report.collect(OUT)


def report() -> None:
  """Syncs the finished runs into ``OUT/runs/`` and regenerates the report from them."""
  sync_results()
  rows = collect()
  if rows:
    ablation_report.write_report(rows, OUT, READINGS, TITLE)


README = REPO / "docs" / "results.md"  # where the committed tables are shown


def readme_markers() -> tuple:
  """The markers in ``docs/results.md`` around the current study's tables."""
  return ablation_report.readme_markers(STUDY)


README_MARKERS = readme_markers()


def update_readme(readme: pathlib.Path = README) -> bool:
  """The current study's tables into ``readme`` (:func:`train.ablation_report.update_readme`).
  Returns whether the file changed."""
  return ablation_report.update_readme(readme, OUT, TITLE, STUDY)


def main(argv=None) -> int:
  from train import cli  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10",
                 help="cifar10: VGG11-BN, every reading; cifar100: VGG13-BN, SGD, the default "
                      "scale-amended reading, LARS, LSALR")
  p.add_argument("--model", choices=("resnet20",), default=None,
                 help="resnet20 (cifar10 only): ResNet-20 width 1/4, SGD (wd 1e-4) and "
                      "scale-amended SGD under each residual input-scale reading (and "
                      "propagated with γ²-aware scalars)")
  p.add_argument("--data-dir", default=None,
                 help="the official extracted directory (default: cifar10 "
                      "../shared/data/cifar10/cifar-10-batches-py, cifar100 "
                      "../data/cifar-100-python, relative to the repository)")
  p.add_argument("--phase", choices=("screen", "confirm"), default="screen")
  p.add_argument("--finalists", nargs="+", default=(), help="READING@LR for --phase confirm")
  p.add_argument("--readings", nargs="+", choices=tuple(_ALL_READINGS), default=None,
                 help="only these readings")
  p.add_argument("--first", nargs="+", default=(), metavar="READING@LR",
                 help="run these runs of the phase first (scheduling only)")
  p.add_argument("--jobs", type=int, default=2)
  p.add_argument("--git-commit", action="store_true",
                 help="commit the results directory after every finished run")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--readme", action="store_true",
                 help="with --report-only: also put the tables into docs/results.md (between "
                      "its <!-- ablation-table[-DATASET]:start/end --> markers)")
  args = p.parse_args(argv)
  name = args.dataset if args.model is None else f"{args.dataset}-{args.model}"
  if name not in STUDIES:
    on = ", ".join(k.split("-")[0] for k in STUDIES if k.endswith(f"-{args.model}"))
    p.error(f"--model {args.model} is studied on {on} only")
  use_study(name, args.data_dir)
  if args.report_only:
    report()
    if args.readme:
      print("docs/results.md updated" if update_readme() else "docs/results.md unchanged")
    return 0
  first_file = "data_batch_1" if DATASET == "cifar10" else "train"
  if not (DATA_DIR / first_file).exists():
    print(f"error: the full {DATASET} is not at {os.path.relpath(DATA_DIR, REPO)} (relative "
          f"to the repository; no {first_file} there): see ../shared/data/README.md, or pass "
          "--data-dir", file=sys.stderr)
    return 1
  runs = screen_runs(collect()) if args.phase == "screen" else confirm_runs(args.finalists)
  if args.readings:
    runs = [r for r in runs if r.reading in args.readings]
  first = [f"{r.reading}@{r.lr:g}" for r in runs]
  unknown = [f for f in args.first if f not in first]
  if unknown:
    print(f"error: --first {unknown[0]!r} is not a run of this phase", file=sys.stderr)
    return 2
  order = {f: i for i, f in enumerate(args.first)}
  runs.sort(key=lambda r: order.get(f"{r.reading}@{r.lr:g}", len(order)))
  if args.dry_run:
    for r in runs:
      print(" ".join(command(r)))
    return 0
  with ThreadPoolExecutor(max(1, args.jobs)) as pool:
    results = list(pool.map(lambda r: execute(r, args.git_commit), runs))
  print(f"{sum(s in ('finished', 'diverged') for s in results)}/{len(runs)} runs done")
  return 0


if __name__ == "__main__":
  sys.exit(main())
