"""The Table 1 grid: VGG × CIFAR × optimizer × seed, then ``table1.md`` and ``curves.png``.

Every run is ``train/cifar.py`` in a subprocess with its own work directory, so the grid
resumes where it stopped: finished runs (final epoch in ``metrics.jsonl``) are skipped,
interrupted ones resume from their last checkpoint. ``--jobs N`` runs N at once.

The table reports, per (dataset, model, optimizer), the median over seeds of the
**final-epoch** test accuracy (no early stopping, no selection on the test split), beside the
paper's Table 1 (SPEC §4). ``curves.png`` plots every seed's test-accuracy curve per optimizer
(like the supplement's Figure 1).

Examples::

  # the paper's grid (GPU/TPU; 96 runs of 200 epochs)
  python train/table1.py --data-dir ~/data/cifar --jobs 1
  # the CPU-sized mini grid on the 4085-image cifar10-mini subset
  python train/table1.py --mini --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
CIFAR_PY = REPO / "train" / "cifar.py"
MODELS = ("vgg11", "vgg13", "vgg16", "vgg19")
DATASETS = ("cifar10", "cifar100")
OPTIMIZERS = ("sgd", "lars", "lsalr", "scale_amended")
OPT_LABELS = {"sgd": "SGD", "lars": "LARS", "lsalr": "LSALR", "scale_amended": "scale-amended"}
OPT_COLORS = {"sgd": "tab:blue", "lars": "tab:orange", "lsalr": "tab:green",
              "scale_amended": "tab:red"}

# Zhang, Chen & Liu (2018), Table 1: median of 3 runs, test accuracy (%).
PAPER = {
    "cifar10": {
        "sgd": (92.34, 93.90, 93.72, 93.47),
        "lars": (91.81, 93.40, 93.47, 93.48),
        "lsalr": (92.58, 93.68, 93.35, 93.46),
        "scale_amended": (92.45, 94.11, 93.90, 93.88),
    },
    "cifar100": {
        "sgd": (71.84, 74.07, 72.86, 71.35),
        "lars": (67.26, 70.35, 69.90, 69.52),
        "lsalr": (71.14, 73.74, 73.14, 70.76),
        "scale_amended": (73.39, 75.32, 74.68, 72.82),
    },
}

MINI_LABEL = "mini run on a 4085-image subset; says nothing about full CIFAR"
MINI = dict(models=["vgg11"], datasets=["cifar10"], optimizers=list(OPTIMIZERS),
            seeds=[0, 1, 2], epochs=40, width=0.125, batch_size=128,
            data_dir=str(REPO.parent / "shared" / "data" / "cifar10-mini"),
            allow_subset=True, cpu_devices=4,
            out=str(REPO / "train" / "results" / "table1_mini"),
            workdir_root=str(REPO / "workdirs" / "table1_mini"))


def paper_value(dataset: str, model: str, optimizer: str) -> Optional[float]:
  try:
    return PAPER[dataset][optimizer][MODELS.index(model)]
  except (KeyError, ValueError):
    return None


def run_name(dataset: str, model: str, optimizer: str, seed: int) -> str:
  return f"{dataset}-{model}-{optimizer}-s{seed}"


def read_metrics(workdir: pathlib.Path) -> list:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def is_finished(workdir: pathlib.Path, epochs: int) -> bool:
  history = read_metrics(workdir)
  return bool(history) and history[-1].get("epoch") == epochs


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="Run the Table 1 grid (models × datasets × optimizers × seeds) with "
                  "train/cifar.py and write table1.md and curves.png. Rerun to resume.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      epilog="Arguments after '--' are passed to every train/cifar.py run.")
  p.add_argument("--mini", action="store_true",
                 help=f"CPU preset: VGG11 width {MINI['width']:g}, {MINI['epochs']} epochs, "
                      "cifar10-mini, 3 seeds, all optimizers; flags given explicitly win")
  p.add_argument("--models", nargs="+", choices=MODELS, default=None)
  p.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
  p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=None)
  p.add_argument("--seeds", nargs="+", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None, help="default 200 (mini: 40)")
  p.add_argument("--width", type=float, default=None, help="default 1 (mini: 0.125)")
  p.add_argument("--batch-size", type=int, default=None, help="default 128")
  p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--data-dir", default=None,
                 help="CIFAR archives (default: tensorflow-datasets; mini: "
                      "../shared/data/cifar10-mini relative to the repo)")
  p.add_argument("--allow-subset", action="store_true", default=None,
                 help="accept known CIFAR subsets (implied by --mini)")
  p.add_argument("--out", default=None,
                 help="results directory (default train/results/table1, mini: "
                      "train/results/table1_mini)")
  p.add_argument("--workdir-root", default=None,
                 help="runs' work directories (default workdirs/table1[_mini], git-ignored)")
  p.add_argument("--jobs", type=int, default=1, help="runs at once")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="on CPU, simulate N XLA devices per run "
                      "(--xla_force_host_platform_device_count; faster than one device on "
                      "a multi-core CPU, same results to float tolerance); mini: 4")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--report-only", action="store_true",
                 help="only (re)write table1.md and curves.png from the finished runs")
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
  if args.mini:
    defaults.update(MINI)
  defaults["compute_dtype"] = "float32"
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.jobs < 1:
    p.error("--jobs must be at least 1")
  return args


def grid(args) -> list:
  # Seed-major: a partly finished grid has every optimizer's first seeds.
  return [(d, m, o, s) for s in args.seeds for d in args.datasets for m in args.models
          for o in args.optimizers]


def command(args, dataset, model, optimizer, seed, workdir) -> list:
  cmd = [sys.executable, str(CIFAR_PY), "--dataset", dataset, "--model", model,
         "--optimizer", optimizer, "--seed", str(seed), "--epochs", str(args.epochs),
         "--batch-size", str(args.batch_size), "--width", f"{args.width:g}",
         "--compute-dtype", args.compute_dtype, "--workdir", str(workdir), "--no-progress"]
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


def run_grid(args) -> list:
  """Runs the unfinished runs, ``args.jobs`` at a time; returns (failed run names, #run)."""
  root = pathlib.Path(args.workdir_root)
  logs = root / "logs"
  todo = []
  for d, m, o, s in grid(args):
    name = run_name(d, m, o, s)
    workdir = root / name
    if is_finished(workdir, args.epochs):
      print(f"skip {name}: finished", flush=True)
      continue
    todo.append((name, command(args, d, m, o, s, workdir)))
  if args.dry_run:
    for name, cmd in todo:
      print(" ".join(shlex.quote(c) for c in cmd))
    return [], 0
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
      else:
        failed.append(name)
        print(f"FAILED {name} (exit {proc.returncode}); see {logs / (name + '.log')}",
              flush=True)
  return failed, len(todo)


def collect(args) -> dict:
  """{(dataset, model, optimizer): {seed: history}} over the grid's finished runs."""
  root = pathlib.Path(args.workdir_root)
  results: dict = {}
  for d, m, o, s in grid(args):
    workdir = root / run_name(d, m, o, s)
    if is_finished(workdir, args.epochs):
      results.setdefault((d, m, o), {})[s] = read_metrics(workdir)
  return results


def _display_path(path: str) -> str:
  """A path relative to the repository when it is near it (as the presets spell it)."""
  if path == "sample" or not os.path.isabs(path):
    return path
  rel = os.path.relpath(path, REPO)
  return rel if rel.count("..") <= 1 else path


def reproduce_command(args) -> str:
  """The table1.py command line for this grid (explicit flags, whatever preset was used)."""
  parts = ["--mini"] if args.mini else []
  parts += ["--models", *args.models, "--datasets", *args.datasets, "--optimizers",
            *args.optimizers, "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs),
            "--width", f"{args.width:g}", "--batch-size", str(args.batch_size)]
  if args.compute_dtype != "float32":
    parts += ["--compute-dtype", args.compute_dtype]
  if args.data_dir:
    parts += ["--data-dir", _display_path(args.data_dir)]
  if args.allow_subset:
    parts += ["--allow-subset"]
  if args.cpu_devices:
    parts += ["--cpu-devices", str(args.cpu_devices)]
  if args.extra:
    parts += ["--", *args.extra]
  return "python train/table1.py " + " ".join(shlex.quote(p) for p in parts)


def write_table(args, results: dict, path: pathlib.Path) -> str:
  cols = [(d, m) for d in args.datasets for m in args.models]
  title = "Table 1 (mini)" if args.mini else "Table 1"
  lines = [f"# {title}: final-epoch test accuracy (%)", ""]
  if args.mini:
    label = MINI_LABEL if os.path.abspath(args.data_dir) == MINI["data_dir"] else (
        f"mini run on a small CIFAR subset ({args.data_dir}); says nothing about full CIFAR")
    lines += [f"**{label}.**", ""]
  lines += [
      f"VGG-BN width {args.width:g}, {args.epochs} epochs, batch {args.batch_size}, "
      f"step decay ×0.1 at 50%/75%, {args.compute_dtype}, data: "
      f"`{_display_path(args.data_dir) if args.data_dir else 'tensorflow-datasets'}`; each "
      "optimizer at the paper's "
      "setting (SGD/LSALR lr 0.1 wd 1e-3, LARS lr 2 wd 1e-3 trust 1e-3, scale-amended lr 0.1 "
      "wd 5e-3; Nesterov momentum 0.9).", "",
      "Cell: median over seeds of the final-epoch test accuracy [each seed's value]; paper's "
      "Table 1 value (median of 3 full-CIFAR runs, full-width VGG, 200 epochs) in "
      "parentheses. Nothing is selected on the test split.", ""]
  head = "| optimizer | " + " | ".join(
      f"{'C10' if d == 'cifar10' else 'C100'} {m.upper()}" for d, m in cols) + " |"
  lines += [head, "|---" * (len(cols) + 1) + "|"]
  for o in args.optimizers:
    cells = []
    for d, m in cols:
      runs = results.get((d, m, o), {})
      accs = [100 * runs[s][-1]["test_acc"] for s in sorted(runs)]
      paper = paper_value(d, m, o)
      paper_s = f" ({paper:.2f})" if paper is not None else ""
      if accs:
        seeds = ", ".join(f"{a:.2f}" for a in accs)
        missing = len(args.seeds) - len(accs)
        note = f", {missing} seed(s) missing" if missing else ""
        cells.append(f"{statistics.median(accs):.2f} [{seeds}{note}]{paper_s}")
      else:
        cells.append(f"—{paper_s}")
    lines.append(f"| {OPT_LABELS[o]} | " + " | ".join(cells) + " |")
  invocations = read_invocations(args)
  total_runs = len(grid(args))
  finished = sum(len(v) for v in results.values())
  run_seconds = sum(h["seconds"] for runs in results.values() for hist in runs.values()
                    for h in hist)
  lines += ["", f"{finished}/{total_runs} runs finished; training time (sum of the runs' "
                f"epoch times) {run_seconds / 60:.1f} min"
            + (f"; wall time of the {len(invocations)} grid invocation(s) that ran runs "
               f"{sum(i['wall_s'] for i in invocations) / 60:.1f} min "
               f"(--jobs {', '.join(sorted({str(i['jobs']) for i in invocations}))}; "
               "2-core CPU shared with other work)" if invocations else "")
            + ".", "",
            f"Reproduce: `{reproduce_command(args)}` (finished runs are skipped, interrupted "
            "ones resume).", ""]
  text = "\n".join(lines)
  path.write_text(text)
  return text


def plot_curves(args, results: dict, path: pathlib.Path) -> None:
  """One row per (dataset, model), one panel per optimizer, one line per seed."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = [(d, m) for d in args.datasets for m in args.models]
  cols = list(args.optimizers)
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.6 * len(cols), 3.0 * len(rows) + 0.6),
                           squeeze=False, sharey="row")
  for r, (d, m) in enumerate(rows):
    for c, o in enumerate(cols):
      ax = axes[r, c]
      for s, hist in sorted(results.get((d, m, o), {}).items()):
        ax.plot([h["epoch"] for h in hist], [100 * h["test_acc"] for h in hist],
                color=OPT_COLORS[o], lw=1, alpha=0.85, label=f"seed {s}",
                ls=("-", "--", ":", "-.")[s % 4])
      ax.set_title(f"{OPT_LABELS[o]} — {'C10' if d == 'cifar10' else 'C100'} {m.upper()}",
                   fontsize=9)
      ax.set_xlabel("epoch", fontsize=8)
      if c == 0:
        ax.set_ylabel("test accuracy (%)", fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
      if ax.lines:
        ax.legend(fontsize=7)
  sup = "Test accuracy per epoch, every seed"
  if args.mini:
    sup += " (mini run on a CIFAR subset; says nothing about full CIFAR)"
  fig.suptitle(sup, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def copy_metrics(args, results: dict, out: pathlib.Path) -> None:
  """Copies each finished run's config.json and metrics.jsonl next to the table."""
  root = pathlib.Path(args.workdir_root)
  dest = out / "runs"
  dest.mkdir(parents=True, exist_ok=True)
  for (d, m, o), runs in results.items():
    for s in runs:
      name = run_name(d, m, o, s)
      for f in ("config.json", "metrics.jsonl"):
        src = root / name / f
        if src.exists():
          (dest / f"{name}.{f}").write_text(src.read_text())


def read_invocations(args) -> list:
  path = pathlib.Path(args.workdir_root) / "invocations.jsonl"
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def log_invocation(args, wall_s: float, ran: int) -> None:
  """Appends this invocation's wall time (only when it ran runs) for the table's time line."""
  root = pathlib.Path(args.workdir_root)
  root.mkdir(parents=True, exist_ok=True)
  with open(root / "invocations.jsonl", "a") as f:
    f.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "wall_s": round(wall_s, 1), "runs": ran, "jobs": args.jobs}) + "\n")


def main(argv=None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  t0 = time.time()
  failed, ran = ([], 0) if args.report_only else run_grid(args)
  if args.dry_run:
    return 0
  elapsed = time.time() - t0
  if ran:
    log_invocation(args, elapsed, ran)
  results = collect(args)
  out.mkdir(parents=True, exist_ok=True)
  text = write_table(args, results, out / "table1.md")
  if results:
    plot_curves(args, results, out / "curves.png")
    copy_metrics(args, results, out)
  print(text)
  print(f"wrote {out / 'table1.md'}" + (f" and {out / 'curves.png'}" if results else ""))
  if failed:
    print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
