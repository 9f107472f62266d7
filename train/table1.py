"""The Table 1 grid: VGG × CIFAR × optimizer × seed, then ``table1.md`` and ``curves.png``.

Every run is ``train/cifar.py`` in a subprocess with its own work directory, so the grid
resumes where it stopped: finished runs (final epoch in ``metrics.jsonl``) are skipped,
interrupted ones resume from their last checkpoint. ``--jobs N`` runs N at once. Before
starting any run the grid loads its data once (the same loader and checks as the runs), so a
missing or corrupt data set is one ``error:`` line, not a grid of failed runs. The report is
refreshed after every finished run, and a results file is never replaced by one holding fewer
finished runs (``--force`` to override), so a grid can span sessions (``--git-commit``
commits the results directory after each run).

The table reports, per (dataset, model, optimizer), the median over seeds of the
**final-epoch** test accuracy (no early stopping, no selection on the test split), beside the
paper's Table 1 (docs/method.md#4-the-optimizers-of-table-1). ``curves.png`` plots every seed's
test-accuracy curve per optimizer (like the supplement's Figure 1); ``figure1.png`` is the paper's Figure 1 style: training loss
and test accuracy per epoch, median over seeds with the seeds' min-max range shaded.

Examples::

  # the paper's grid (GPU/TPU; 96 runs of 200 epochs)
  python train/table1.py --data-dir ~/data/cifar --jobs 1
  # the CPU-sized mini grid on the 4085-image cifar10-mini subset
  python train/table1.py --mini --jobs 1
  # Table 1 at CPU scale on the full CIFAR-10 (VGG13 width 1/8, 30 epochs, 3 seeds)
  python train/table1.py --cpu-full --jobs 2 --git-commit
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (python train/table1.py): `train` is a package
  sys.path.insert(0, str(REPO))
CIFAR_PY = REPO / "train" / "cifar.py"

# pylint: disable=wrong-import-position
from train import cli
from train.config import PAPER_SETTINGS
from train.table1_report import (CPU_FULL, DATASETS, MINI, MODELS, OPTIMIZERS, PRESETS,
                                 display_path, finished_history, grid, read_metrics, run_name,
                                 write_report)


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(
      description="Run the Table 1 grid (models × datasets × optimizers × seeds) with "
                  "train/cifar.py and write table1.md and curves.png. Rerun to resume.",
      epilog="Arguments after '--' are passed to every train/cifar.py run.")
  preset = p.add_mutually_exclusive_group()
  preset.add_argument("--mini", action="store_true",
                      help=f"CPU preset: VGG11 width {MINI['width']:g}, {MINI['epochs']} "
                           "epochs, cifar10-mini, 3 seeds, all optimizers; flags given "
                           "explicitly win")
  preset.add_argument("--cpu-full", action="store_true",
                      help=f"CPU preset on the full CIFAR-10: VGG13 width "
                           f"{CPU_FULL['width']:g}, {CPU_FULL['epochs']} epochs, step decay, "
                           "3 seeds, all optimizers, ../shared/data/cifar10/cifar-10-batches-py "
                           "relative to the repo; flags given explicitly win")
  preset.add_argument("--cpu-full-cifar100", action="store_true",
                      help="the same on the full CIFAR-100 (../data/cifar-100-python "
                           "relative to the repo, rebuilt by "
                           "../shared/data/cifar100/rebuild.py), every optimizer at its "
                           "learning rate chosen on validation in "
                           "train/results/ablation_cifar100, --log-blocks")
  p.add_argument("--models", nargs="+", choices=MODELS, default=None)
  p.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
  p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=None)
  p.add_argument("--seeds", nargs="+", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None, help="default 200 (mini: 40, cpu-full: 30)")
  p.add_argument("--width", type=float, default=None, help="default 1 (mini, cpu-full: 0.125)")
  p.add_argument("--batch-size", type=int, default=None, help="default 128")
  p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--data-dir", default=None,
                 help="CIFAR archives (default: tensorflow-datasets; mini: "
                      "../shared/data/cifar10-mini, cpu-full: "
                      "../shared/data/cifar10/cifar-10-batches-py, relative to the repo)")
  p.add_argument("--allow-subset", action="store_true", default=None,
                 help="accept known CIFAR subsets (implied by --mini)")
  p.add_argument("--out", default=None,
                 help="results directory (default train/results/table1, mini: "
                      "train/results/table1_mini, cpu-full: train/results/table1_cpu_full)")
  p.add_argument("--workdir-root", default=None,
                 help="runs' work directories (default workdirs/table1[_mini|_cpu_full], "
                      "git-ignored)")
  p.add_argument("--lr", action="append", default=None, metavar="OPTIMIZER=LR",
                 help="one optimizer's learning rate instead of the paper's (repeatable); "
                      "cpu-full: scale-amended's as chosen on validation in "
                      "train/results/ablation_cifar10 "
                      "(docs/method.md#65-the-learning-rate-chosen-on-validation)")
  p.add_argument("--jobs", type=int, default=1, help="runs at once")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="on CPU, simulate N XLA devices per run "
                      "(--xla_force_host_platform_device_count; faster than one device on "
                      "a multi-core CPU, same results to float tolerance); mini: 4, cpu-full: 1")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--report-only", action="store_true",
                 help="only (re)write table1.md and the plots from the finished runs")
  p.add_argument("--force", action="store_true",
                 help="rewrite the results even if the table there holds more finished runs "
                      "than this grid finds")
  p.add_argument("--git-commit", action="store_true",
                 help="after each finished run, git-commit the results directory (only the "
                      "files under it)")
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  args = p.parse_args(argv)
  args.extra = extra
  defaults = dict(models=list(MODELS), datasets=list(DATASETS), optimizers=list(OPTIMIZERS),
                  seeds=[0, 1, 2], epochs=200, width=1.0, batch_size=128, data_dir=None,
                  allow_subset=False, cpu_devices=None,
                  out=str(REPO / "train" / "results" / "table1"),
                  workdir_root=str(REPO / "workdirs" / "table1"))
  args.preset = ("mini" if args.mini else "cpu_full" if args.cpu_full else
                 "cpu_full_cifar100" if args.cpu_full_cifar100 else None)
  if args.preset:
    defaults.update(PRESETS[args.preset])
  defaults["compute_dtype"] = "float32"
  lrs = dict(defaults.pop("lrs", {}))
  # A preset's own train/cifar.py flags come before the user's (after '--'): the user's win.
  args.extra = list(defaults.pop("extra", [])) + args.extra
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  for item in args.lr or ():
    opt, _, value = item.partition("=")
    try:
      lr = float(value)
    except ValueError:
      lr = float("nan")
    if opt not in OPTIMIZERS or not lr > 0:
      p.error(f"--lr {item!r}: expected OPTIMIZER=LR with OPTIMIZER one of "
              f"{', '.join(OPTIMIZERS)} and LR > 0")
    lrs[opt] = lr
  args.lrs = lrs
  # The runs start in the repository: paths given on the command line are the user's (cwd).
  for k in ("out", "workdir_root"):
    setattr(args, k, os.path.abspath(os.path.expanduser(getattr(args, k))))
  if args.data_dir not in (None, "sample"):
    args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
  if args.jobs < 1:
    p.error("--jobs must be at least 1")
  return args


def command(args, dataset, model, optimizer, seed, workdir) -> list:
  cmd = [sys.executable, str(CIFAR_PY), "--dataset", dataset, "--model", model,
         "--optimizer", optimizer, "--seed", str(seed), "--epochs", str(args.epochs),
         "--batch-size", str(args.batch_size), "--width", f"{args.width:g}",
         "--compute-dtype", args.compute_dtype, "--workdir", str(workdir), "--no-progress"]
  # The grid is the paper's setting unless --lr says otherwise: its lr is passed explicitly,
  # not left to train/cifar.py's default (chosen on validation since), so every committed
  # run's config stays the same and resumable.
  cmd += ["--lr", f"{args.lrs.get(optimizer, PAPER_SETTINGS[optimizer][0]):g}"]
  if args.data_dir:
    cmd += ["--data-dir", args.data_dir]
  if args.allow_subset:
    cmd += ["--allow-subset"]
  return cmd + list(args.extra)


def child_env(args) -> dict:
  """The runs' environment: simulated CPU devices if asked, a shared compilation cache."""
  env = dict(os.environ)
  # Runs of the grid compile the same programs (seeds share them): compile once.
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 str(pathlib.Path(args.workdir_root).resolve() / ".jax_cache"))
  if args.cpu_devices:
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                                  f"{args.cpu_devices}").strip()
  return env


def pending_runs(args) -> list:
  """The grid's unfinished runs as (name, command); prints a line per finished one."""
  root = pathlib.Path(args.workdir_root)
  todo = []
  for d, m, o, s in grid(args):
    name = run_name(d, m, o, s)
    workdir = root / name
    if finished_history(args, name) is not None:
      print(f"skip {name}: finished", flush=True)
      continue
    todo.append((name, command(args, d, m, o, s, workdir)))
  return todo


def check_data(args) -> Optional[str]:
  """Loads each dataset of the grid once, with the runs' loader and checks; None or the error.

  Run before any job starts, so that a missing, truncated or foreign data set stops the grid
  with one message instead of a grid of failed runs.
  """
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  for dataset in args.datasets:
    try:
      ds = data_lib.load_cifar(dataset, args.data_dir, allow_subset=args.allow_subset)
    except data_lib.DataError as e:
      return str(e)
    print(f"data: {ds.source}", flush=True)
    del ds
    gc.collect()
  return None


def run_grid(args, todo: list, on_done=None) -> tuple:
  """Runs ``todo`` ((name, command) pairs), ``args.jobs`` at a time.

  ``on_done(name)`` is called after each run that exits 0. Returns (failed run names, #run).
  """
  root = pathlib.Path(args.workdir_root)
  logs = root / "logs"
  if not todo:
    return [], 0
  logs.mkdir(parents=True, exist_ok=True)
  env = child_env(args)
  running: dict = {}
  failed = []
  pending = list(todo)
  done = 0
  t0 = time.time()
  while pending or running:
    while pending and len(running) < args.jobs:
      name, cmd = pending.pop(0)
      log = open(logs / f"{name}.log", "a")
      log.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
      log.flush()
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
      running[name] = (proc, log, time.time())
      print(f"start {name} ({len(todo) - len(pending)}/{len(todo)})", flush=True)
    time.sleep(1.0)
    for name in list(running):
      proc, log, started = running[name]
      if proc.poll() is None:
        continue
      log.close()
      del running[name]
      done += 1
      history = read_metrics(root / name)
      if proc.returncode == 0:
        acc = f"final test acc {100 * history[-1]['test_acc']:.2f}%" if history else ""
        print(f"done  {name} in {time.time() - started:.0f}s: {acc} "
              f"[{done}/{len(todo)}, {time.time() - t0:.0f}s elapsed]", flush=True)
        if on_done is not None:
          on_done(name)
      else:
        failed.append(name)
        print(f"FAILED {name} (exit {proc.returncode}); see {logs / (name + '.log')}",
              flush=True)
  return failed, len(todo)


def log_invocation(args, wall_s: float, ran: int) -> None:
  """Appends this invocation's wall time (only when it ran runs) for the table's time line."""
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "invocations.jsonl", "a") as f:
    started = time.localtime(time.time() - wall_s)  # logged at the end: subtract the wall time
    f.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S", started),
                        "wall_s": round(wall_s, 1), "runs": ran, "jobs": args.jobs}) + "\n")


def git_commit(path: str, message: str, retries: int = 10) -> bool:
  """Commits the files under ``path`` (and nothing else) with ``message``; False on failure."""
  for attempt in range(retries):
    add = subprocess.run(["git", "-C", path, "add", "--", "."], capture_output=True, text=True)
    commit = None
    if add.returncode == 0:
      staged = subprocess.run(["git", "-C", path, "diff", "--cached", "--quiet", "--", "."],
                              capture_output=True, text=True)
      if staged.returncode == 0:
        return True  # nothing new under path
      commit = subprocess.run(["git", "-C", path, "commit", "-q", "-m", message, "--", "."],
                              capture_output=True, text=True)
      if commit.returncode == 0:
        return True
    err = (commit or add).stderr
    if "index.lock" not in err or attempt == retries - 1:
      print(f"warning: git commit of {path} failed: {err.strip()[:300]}", file=sys.stderr)
      return False
    time.sleep(3.0)
  return False


def main(argv=None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  t0 = time.time()
  failed, ran = [], 0
  if not args.report_only:
    todo = pending_runs(args)
    if args.dry_run:
      for _, cmd in todo:
        print(" ".join(shlex.quote(c) for c in cmd))
      return 0
    if todo:
      error = check_data(args)  # before any job: one line, nothing started, nothing written
      if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1

      def on_done(name):
        if write_report(args, args.force) is not None and args.git_commit:
          git_commit(str(out), f"{os.path.basename(args.out)}: {name} finished")

      failed, ran = run_grid(args, todo, on_done)
  elapsed = time.time() - t0
  if ran:
    log_invocation(args, elapsed, ran)
  text = write_report(args, args.force)
  if text is not None:
    print(text)
    print(f"wrote {display_path(str(out / 'table1.md'))} and the plots")
    if ran and args.git_commit:
      git_commit(str(out), f"{os.path.basename(args.out)}: report after {ran} run(s) "
                           f"({len(failed)} failed)")
  if failed:
    print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
