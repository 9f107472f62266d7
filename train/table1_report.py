"""The Table 1 grid's definition and results: ``table1.md`` (figures: ``table1_figures``).

What the grid is (models, datasets, optimizers, the CPU presets, the paper's numbers), which
runs are finished (their ``metrics.jsonl``, in the work directory or the copy committed beside
the table), and the report written from them. ``train/table1.py`` runs the grid.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import statistics
import sys
from typing import Optional

from train import atomic

REPO = pathlib.Path(__file__).resolve().parent.parent
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

CPU_FULL_LABEL = ("CPU-scale run on the full CIFAR-10 (VGG13-BN at width 1/8, 30 epochs); the "
                  "paper trains full-width networks for 200 epochs")
CPU_FULL = dict(models=["vgg13"], datasets=["cifar10"], optimizers=list(OPTIMIZERS),
                seeds=[0, 1, 2], epochs=30, width=0.125, batch_size=128,
                data_dir=str(REPO.parent / "shared" / "data" / "cifar10" / "cifar-10-batches-py"),
                # One XLA device per run: with 4 simulated devices two runs side by side on
                # 2 loaded cores aborted in XLA:CPU's all-reduce rendezvous (40 s timeout).
                allow_subset=False, cpu_devices=None,
                # Scale-amended SGD's learning rate as chosen on validation:
                # docs/method.md#65-the-learning-rate-chosen-on-validation.
                lrs={"scale_amended": 0.03},
                out=str(REPO / "train" / "results" / "table1_cpu_full"),
                workdir_root=str(REPO / "workdirs" / "table1_cpu_full"))
CPU_FULL_C100_LABEL = ("CPU-scale run on the full CIFAR-100 (VGG13-BN at width 1/8, 30 "
                       "epochs); the paper trains full-width networks for 200 epochs")
CPU_FULL_C100 = dict(
    models=["vgg13"], datasets=["cifar100"], optimizers=list(OPTIMIZERS),
    seeds=[0, 1, 2], epochs=30, width=0.125, batch_size=128,
    # Rebuilt byte for byte by ../shared/data/cifar100/rebuild.py; never committed.
    data_dir=str(REPO.parent / "data" / "cifar-100-python"),
    allow_subset=False, cpu_devices=None,
    # Every optimizer at its learning rate chosen on the CIFAR-100 validation split
    # (train/results/ablation_cifar100). Scale-amended SGD's is 0.1 there, the paper's own
    # setting, so its "paper setting" row and its "validation-chosen" row are the same runs.
    lrs={"sgd": 0.1, "lars": 4.0, "lsalr": 0.03, "scale_amended": 0.1},
    # The per-block angular steps, for the figure of SGD's and scale-amended SGD's blocks.
    extra=["--log-blocks"],
    out=str(REPO / "train" / "results" / "table1_cpu_full_cifar100"),
    workdir_root=str(REPO / "workdirs" / "table1_cpu_full_cifar100"))
PRESETS = {"mini": MINI, "cpu_full": CPU_FULL, "cpu_full_cifar100": CPU_FULL_C100}
# The CPU presets on full data sets, their flags, labels and the screen that chose their lrs.
CPU_PRESETS = {"cpu_full": (CPU_FULL, "--cpu-full", CPU_FULL_LABEL, "ablation_cifar10"),
               "cpu_full_cifar100": (CPU_FULL_C100, "--cpu-full-cifar100",
                                     CPU_FULL_C100_LABEL, "ablation_cifar100")}


def paper_value(dataset: str, model: str, optimizer: str) -> Optional[float]:
  try:
    return PAPER[dataset][optimizer][MODELS.index(model)]
  except (KeyError, ValueError):
    return None


def run_name(dataset: str, model: str, optimizer: str, seed: int) -> str:
  return f"{dataset}-{model}-{optimizer}-s{seed}"


def _read_jsonl(path: pathlib.Path) -> list:
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: pathlib.Path) -> list:
  return _read_jsonl(workdir / "metrics.jsonl")


def is_diverged(history: list) -> bool:
  """The run stopped on a non-finite training loss (train/cifar.py marks that record)."""
  return bool(history) and bool(history[-1].get("diverged"))


def is_finished(history: list, epochs: int) -> bool:
  """Trained to the last epoch, or diverged (nothing to resume: rerunning would fail again)."""
  return bool(history) and (history[-1].get("epoch") == epochs or is_diverged(history))


def run_files(args, name: str, filename: str) -> tuple:
  """Where a run's ``filename`` lies: its work directory, then the copy committed beside the
  table (``<out>/runs/``; work directories are git-ignored and do not survive into a fresh
  checkout, so a grid that spans sessions resumes from the committed runs)."""
  return (pathlib.Path(args.workdir_root) / name / filename,
          pathlib.Path(args.out) / "runs" / f"{name}.{filename}")


def finished_history(args, name: str) -> Optional[list]:
  """A finished run's metrics, from the first of :func:`run_files` holding a finished run;
  None if neither does."""
  for path in run_files(args, name, "metrics.jsonl"):
    history = _read_jsonl(path)
    if is_finished(history, args.epochs):
      return history
  return None


def grid(args) -> list:
  # Seed-major: a partly finished grid has every optimizer's first seeds.
  return [(d, m, o, s) for s in args.seeds for d in args.datasets for m in args.models
          for o in args.optimizers]


def collect(args) -> dict:
  """{(dataset, model, optimizer): {seed: history}} over the grid's finished runs."""
  results: dict = {}
  for d, m, o, s in grid(args):
    history = finished_history(args, run_name(d, m, o, s))
    if history is not None:
      results.setdefault((d, m, o), {})[s] = history
  return results


def display_path(path: str) -> str:
  """A path relative to the repository when it is near it (as the presets spell it)."""
  if path == "sample" or not os.path.isabs(path):
    return path
  rel = os.path.relpath(path, REPO)
  return rel if rel.count("..") <= 1 else path


def reproduce_command(args) -> str:
  """The table1.py command line for this grid (explicit flags, whatever preset was used)."""
  parts = ["--mini"] if args.mini else (
      [CPU_PRESETS[args.preset][1]] if args.preset in CPU_PRESETS else [])
  parts += ["--models", *args.models, "--datasets", *args.datasets, "--optimizers",
            *args.optimizers, "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs),
            "--width", f"{args.width:g}", "--batch-size", str(args.batch_size)]
  if args.compute_dtype != "float32":
    parts += ["--compute-dtype", args.compute_dtype]
  if args.data_dir:
    parts += ["--data-dir", display_path(args.data_dir)]
  if args.allow_subset:
    parts += ["--allow-subset"]
  if args.cpu_devices:
    parts += ["--cpu-devices", str(args.cpu_devices)]
  for opt, lr in sorted(args.lrs.items()):
    parts += ["--lr", f"{opt}={lr:g}"]
  extra = list(args.extra)
  preset_extra = PRESETS.get(args.preset, {}).get("extra", [])
  if extra[:len(preset_extra)] == preset_extra:  # the preset's flag implies these
    extra = extra[len(preset_extra):]
  if extra:
    parts += ["--", *extra]
  return "python train/table1.py " + " ".join(shlex.quote(p) for p in parts)


def _lr_note(args) -> str:
  if not args.lrs:
    return ""
  from train.config import PAPER_SETTINGS  # pylint: disable=import-outside-toplevel
  same = lambda o, lr: lr == PAPER_SETTINGS[o][0]  # noqa: E731
  return (", except the learning rate" + ("s" if len(args.lrs) > 1 else "") + " of " +
          ", ".join(f"{OPT_LABELS[o]} ({lr:g}{', the paper’s too' if same(o, lr) else ''})"
                    for o, lr in sorted(args.lrs.items())) +
          (f", chosen on a validation split in `train/results/{CPU_PRESETS[args.preset][3]}` "
           "(docs/method.md#65-the-learning-rate-chosen-on-validation)"
           if args.preset in CPU_PRESETS and args.lrs == CPU_PRESETS[args.preset][0]["lrs"]
           else "") +
          # The paper's exact scale-amended setting is a row of its own unless it is this one.
          (". Scale-amended SGD's learning rate here is the paper's, with the paper's weight "
           "decay: its row is also the paper's exact setting"
           if "scale_amended" in args.optimizers and same("scale_amended",
                                                          args.lrs.get("scale_amended", -1))
           else ""))


def _sa_reading_note(args, results: dict) -> str:
  """The reading of the open points the scale-amended runs used, as their config.json records
  it (docs/method.md#6-open-points-and-what-decided-them)."""
  readings = set()
  for (d, m, o), runs in results.items():
    if o != "scale_amended":
      continue
    for s in runs:
      for path in run_files(args, run_name(d, m, o, s), "config.json"):
        if path.exists():
          c = json.loads(path.read_text())
          readings.add((c.get("sa_pooling"), c.get("sa_scale_others"), c.get("sa_gamma_aware"),
                        c.get("sa_decay_before_scaling")))
          break
  if not readings:
    return ""
  if readings == {(None,) * 4}:  # configs from before the reading was recorded (issue 11)
    return (" Scale-amended reading: SPEC v1 (bias/BatchNorm scaled), the library's default "
            "when these runs were made; today's default leaves them unscaled.")
  if len(readings) > 1 or None in next(iter(readings)):
    return (" Scale-amended runs: reading "
            "(docs/method.md#6-open-points-and-what-decided-them) not recorded "
            "in every config or not the same in all (see runs/*.config.json).")
  pooling, others, gamma, before = next(iter(readings))
  return (" Scale-amended reading "
          f"(docs/method.md#6-open-points-and-what-decided-them, from the runs' configs): "
          f"`s` {pooling} pooling, "
          f"bias/BatchNorm {'scaled' if others else 'unscaled'}, γ² "
          f"{'aware' if gamma else 'ignored'}, decay {'before' if before else 'after'} the "
          "scaling.")


def write_table(args, results: dict, path: pathlib.Path) -> str:
  cols = [(d, m) for d in args.datasets for m in args.models]
  title = {"mini": "Table 1 (mini)", "cpu_full": "Table 1 (CPU scale, full CIFAR-10)",
           "cpu_full_cifar100": "Table 1 (CPU scale, full CIFAR-100)"}.get(args.preset,
                                                                            "Table 1")
  lines = [f"# {title}: final-epoch test accuracy (%)", ""]
  if args.mini:
    label = MINI_LABEL if os.path.abspath(args.data_dir) == MINI["data_dir"] else (
        f"mini run on a small CIFAR subset ({display_path(args.data_dir)}); says nothing "
        "about full CIFAR")
    lines += [f"**{label}.**", ""]
  elif args.preset in CPU_PRESETS:
    preset, _, preset_label, _ = CPU_PRESETS[args.preset]
    same = (args.models, args.epochs, args.width) == (
        preset["models"], preset["epochs"], preset["width"])
    label = preset_label if same else (
        f"CPU-scale run ({', '.join(m.upper() for m in args.models)}-BN at width "
        f"{args.width:g}, {args.epochs} epochs); the paper trains full-width networks for "
        "200 epochs")
    lines += [f"**{label}.**", ""]
  lines += [
      f"Budget: VGG-BN width {args.width:g}, {args.epochs} epochs, batch {args.batch_size}, "
      f"step decay ×0.1 at 50%/75%, {args.compute_dtype}, data: "
      f"`{display_path(args.data_dir) if args.data_dir else 'tensorflow-datasets'}`; each "
      "optimizer at the paper's "
      "setting (SGD/LSALR lr 0.1 wd 1e-3, LARS lr 2 wd 1e-3 trust 1e-3, scale-amended lr 0.1 "
      "wd 5e-3; Nesterov momentum 0.9)" + _lr_note(args) + "." + _sa_reading_note(args, results),
      "",
      "Cell: median over seeds of the final-epoch test accuracy [each seed's value]; paper's "
      "Table 1 value (median of 3 full-CIFAR runs, full-width VGG, 200 epochs) in "
      "parentheses. Nothing is selected on the test split; a run that diverged (non-finite "
      "training loss) is listed as such and left out of the median.", ""]
  head = "| optimizer | " + " | ".join(
      f"{'C10' if d == 'cifar10' else 'C100'} {m.upper()}" for d, m in cols) + " |"
  lines += [head, "|---" * (len(cols) + 1) + "|"]
  for o in args.optimizers:
    cells = []
    for d, m in cols:
      runs = results.get((d, m, o), {})
      ok = [s for s in sorted(runs) if not is_diverged(runs[s])]
      accs = [100 * runs[s][-1]["test_acc"] for s in ok]
      diverged = [f"diverged in epoch {runs[s][-1]['epoch']}" for s in sorted(runs)
                  if s not in ok]
      paper = paper_value(d, m, o)
      paper_s = f" ({paper:.2f})" if paper is not None else ""
      missing = len(args.seeds) - len(runs)
      note = ([f"{missing} seed(s) missing"] if missing else [])
      if accs:
        seeds = ", ".join([f"{a:.2f}" for a in accs] + diverged + note)
        cells.append(f"{statistics.median(accs):.2f} [{seeds}]{paper_s}")
      elif diverged:
        cells.append(f"— [{', '.join(diverged + note)}]{paper_s}")
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
            + (f"; sum of the wall times of the {len(invocations)} grid invocation(s) that ran "
               "runs "
               f"{sum(i['wall_s'] for i in invocations) / 60:.1f} min "
               f"(--jobs {', '.join(sorted({str(i['jobs']) for i in invocations}))}; "
               "2-core CPU shared with other work)" if invocations else "")
            + ".", "",
            f"Reproduce: `{reproduce_command(args)}` (finished runs are skipped, interrupted "
            "ones resume).", ""]
  text = "\n".join(lines)
  atomic.write_text(path, text)
  return text


_FINISHED_RE = re.compile(r"^(\d+)/(\d+) runs finished", re.M)


def finished_in_table(path: pathlib.Path) -> int:
  """How many finished runs the table at ``path`` reports (0 if none or unreadable)."""
  try:
    m = _FINISHED_RE.search(path.read_text())
  except OSError:
    return 0
  return int(m.group(1)) if m else 0


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
          text = src.read_text()
          if f == "config.json":
            text = portable_config(text)
          atomic.write_text(dest / f"{name}.{f}", text)


def portable_config(text: str) -> str:
  """A run's config.json with its data path as ``train.data.portable_path`` records it
  (relative to the repository or ``../shared``), so committed copies name no machine path."""
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  config = json.loads(text)
  if config.get("data_dir") not in (None, "sample"):
    config["data_dir"] = data_lib.portable_path(config["data_dir"])
  return json.dumps(config, indent=2) + "\n"


def read_invocations(args) -> list:
  # Beside the table (committed with it), so the time line survives a fresh clone.
  path = pathlib.Path(args.out) / "invocations.jsonl"
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_report(args, force: bool = False) -> Optional[str]:
  """Writes table1.md, curves.png, figure1.png and the runs' copies from the finished runs.

  Never replaces a table holding more finished runs than this grid finds (say the work
  directories are missing in this clone) unless ``force``; returns the table's text, or None
  when the results directory was kept.
  """
  out = pathlib.Path(args.out)
  results = collect(args)
  finished = sum(len(v) for v in results.values())
  on_disk = finished_in_table(out / "table1.md")
  if finished < on_disk and not force:
    print(f"warning: kept {display_path(str(out / 'table1.md'))}: it reports {on_disk} "
          f"finished run(s), this grid finds {finished} in "
          f"{display_path(args.workdir_root)} (use --force to replace it)", file=sys.stderr)
    return None
  out.mkdir(parents=True, exist_ok=True)
  text = write_table(args, results, out / "table1.md")
  if results:
    # Imported here: the figures module reads this module's definitions.
    from train import table1_figures  # pylint: disable=import-outside-toplevel
    table1_figures.plot_curves(args, results, out / "curves.png")
    table1_figures.plot_figure1(args, results, out / "figure1.png")
    table1_figures.plot_blocks(args, results, out / "blocks.png")
    copy_metrics(args, results, out)
  return text
