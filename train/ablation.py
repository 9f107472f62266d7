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

Examples::

  python train/ablation.py --phase screen --jobs 2
  python train/ablation.py --phase confirm --finalists sgd@0.1 sa_unscaled@0.03 --jobs 2
  python train/ablation.py --report-only --readme   # tables -> ablation.md and docs/results.md
  python train/ablation.py --dataset cifar100 --phase screen --jobs 1 --git-commit
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
CIFAR_PY = REPO / "train" / "cifar.py"
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10" / "cifar-10-batches-py"
OUT = REPO / "train" / "results" / "ablation_cifar10"
WORKDIRS = REPO / "workdirs" / "ablation_cifar10"
VAL_SPLIT = 5000
MODEL, WIDTH, BATCH = "vgg11", 0.125, 128

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
LRS = (0.1, 0.03, 0.3, 0.01)  # run in this order: the most informative first
LARS_LRS = (2.0, 1.0, 4.0)
LSALR_LRS = (0.1, 0.03, 0.3)
# Where a sweep is extended when its best learning rate is at one of its ends.
LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LARS_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SCREEN_EPOCHS, CONFIRM_EPOCHS, CONFIRM_SEEDS = 10, 30, (0, 1, 2)
COLORS = {"sgd": "tab:blue", "lars": "tab:orange", "lsalr": "tab:olive", "sa_v1": "tab:red", "sa_unscaled": "tab:green",
          "sa_pool_after": "tab:purple", "sa_pool_effective": "tab:brown",
          "sa_gamma": "tab:pink", "sa_decay_after": "tab:gray"}


TITLE = "Full CIFAR-10, VGG11-BN"  # figures and tables


class Study(NamedTuple):
  """One dataset's ablation: what :func:`use_study` puts into this module's globals."""
  dataset: str
  model: str
  title: str
  data_dir: pathlib.Path
  readings: tuple


STUDIES = {
    "cifar10": Study("cifar10", "vgg11", "Full CIFAR-10, VGG11-BN", DATA_DIR, tuple(READINGS)),
    "cifar100": Study("cifar100", "vgg13", "Full CIFAR-100, VGG13-BN",
                      REPO.parent / "data" / "cifar-100-python",
                      ("sgd", "sa_unscaled", "lars", "lsalr")),
}
_ALL_READINGS = {**READINGS, "lsalr": LSALR}


def use_study(dataset: str, data_dir: Optional[str] = None) -> Study:
  """Points the module's globals (data, model, readings, output and work directories) at one
  dataset's study; CIFAR-10's is the default at import."""
  global DATA_DIR, OUT, WORKDIRS, MODEL, READINGS, TITLE, DATASET  # pylint: disable=global-statement
  study = STUDIES[dataset]
  DATASET, MODEL, TITLE = study.dataset, study.model, study.title
  DATA_DIR = pathlib.Path(data_dir).resolve() if data_dir else study.data_dir
  OUT = REPO / "train" / "results" / f"ablation_{dataset}"
  WORKDIRS = REPO / "workdirs" / f"ablation_{dataset}"
  READINGS = {r: _ALL_READINGS[r] for r in study.readings}
  return study


DATASET = "cifar10"


def sweep(reading: str) -> tuple:
  """The screen's base learning rates of ``reading``, in the order they run."""
  return {"lars": LARS_LRS, "lsalr": LSALR_LRS}.get(reading, LRS)


class Run(NamedTuple):
  reading: str
  lr: float
  epochs: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.reading}-lr{self.lr:g}-e{self.epochs}-s{self.seed}"


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


def read_metrics(path: pathlib.Path) -> list:
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def status(history: list, epochs: int) -> str:
  if history and history[-1].get("diverged"):
    return "diverged"
  if history and history[-1].get("epoch") == epochs:
    return "finished"
  return "unfinished" if history else "not started"


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
      _commit([str(OUT.relative_to(REPO))], f"ablation_{DATASET}: {run.name} {st}")
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
# Report


def collect() -> list:
  rows = []
  for cfg in sorted(OUT.glob("runs/*.config.json")):
    name = cfg.name[:-len(".config.json")]
    reading, lr, epochs, seed = name.rsplit("-", 3)
    hist = read_metrics(OUT / "runs" / f"{name}.metrics.jsonl")
    run = Run(reading, float(lr[2:]), int(epochs[1:]), int(seed[1:]))
    rows.append((run, hist, status(hist, run.epochs)))
  return rows


def _final(hist, key):
  v = hist[-1].get(key) if hist else None
  return None if v is None else float(v)


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


def _spread(xs) -> str:
  xs = [x for x in xs if x is not None]
  if not xs:
    return "—"
  med = statistics.median(xs)
  return f"{100 * med:.2f} [{100 * min(xs):.2f}–{100 * max(xs):.2f}]" if len(xs) > 1 else \
      f"{100 * med:.2f}"


def best_lrs(rows, epochs: int) -> dict:
  """Per reading, the learning rate with the highest final validation accuracy (seed 0)."""
  best = {}
  for run, hist, st in rows:
    if run.epochs != epochs or run.seed != 0:
      continue
    acc = _final(hist, "val_acc") if st == "finished" else None
    if acc is not None and (run.reading not in best or acc > best[run.reading][1]):
      best[run.reading] = (run.lr, acc)
  return best


def write_table(rows) -> str:
  lines = [
      f"# Does scale-amended SGD beat SGD? Ablation on the {TITLE.split(',')[0].replace('Full', 'full')}",
      "",
      f"{TITLE.split(', ')[1]} width {WIDTH:g}, batch {BATCH}, step decay (x0.1 at 50% and 75%), Nesterov "
      f"momentum 0.9, float32, CPU. Training on 45,000 images; the last {VAL_SPLIT:,} training "
      "images are a held-out validation split (choices are made on it); test = the official "
      "10,000 test images (reported, never used to choose). Final-epoch numbers. Weight decay: "
      "SGD/LARS 1e-3, scale-amended 5e-3 (the paper's settings). Generated by "
      "`python train/ablation.py --report-only` from `runs/`.",
      "",
  ]
  for epochs, title in ((SCREEN_EPOCHS, "Screen: one seed"),
                        (CONFIRM_EPOCHS, "Confirmation: up to 3 seeds")):
    sel = [r for r in rows if r[0].epochs == epochs]
    if not sel:
      continue
    lines += [f"## {title}, {epochs} epochs", ""]
    if epochs == SCREEN_EPOCHS:
      lrs = sorted({r[0].lr for r in sel})
      lines += ["Final validation accuracy % (test accuracy %) per learning rate; "
                "`div` = training loss turned non-finite (run stopped); the best learning "
                "rate of each reading on validation in bold.", ""]
      lines += ["| reading | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
      best = best_lrs(rows, epochs)
      for reading, (label, _) in READINGS.items():
        cells, any_run = [], False
        for lr in lrs:
          match = [r for r in sel if r[0].reading == reading and r[0].lr == lr]
          if not match:
            cells.append("")
            continue
          any_run = True
          _, hist, st = match[0]
          if st == "diverged":
            cells.append(f"div (ep {hist[-1]['epoch']})")
            continue
          if st != "finished":
            cells.append("…")
            continue
          cell = f"{_pct(_final(hist, 'val_acc'))} ({_pct(_final(hist, 'test_acc'))})"
          if best.get(reading, (None,))[0] == lr:
            cell = f"**{cell}**"
          cells.append(cell)
        if any_run:
          lines.append(f"| {label} | " + " | ".join(cells) + " |")
      lines.append("")
    else:
      lines += ["Median [min–max] over seeds of the final-epoch accuracy %, best median "
                "validation accuracy first.", "",
                "| reading | lr | seeds | validation | test | train loss |", "|---|---|---|---|---|---|"]
      groups = {}
      for r in sel:
        if r[2] == "finished":
          groups.setdefault((r[0].reading, r[0].lr), []).append(r)
      order = sorted(groups, key=lambda k: -statistics.median(
          _final(h, "val_acc") or 0.0 for _, h, _ in groups[k]))
      for reading, lr in order:
        fin = groups[(reading, lr)]
        loss = statistics.median(_final(h, "train_loss") or float("nan") for _, h, _ in fin)
        lines.append(f"| {READINGS[reading][0]} | {lr:g} | {len(fin)} | "
                     f"{_spread([_final(h, 'val_acc') for _, h, _ in fin])} | "
                     f"{_spread([_final(h, 'test_acc') for _, h, _ in fin])} | {loss:.3f} |")
      lines.append("")
  lines += _block_table(rows)
  text = "\n".join(lines) + "\n"
  tmp = OUT / ".ablation.md.tmp"
  tmp.write_text(text)
  os.replace(tmp, OUT / "ablation.md")
  return text


def _block_table(rows) -> list:
  """Per block at the best lr of each reading (screen): angular step, factor, |W|, E[γ²]."""
  best = best_lrs(rows, SCREEN_EPOCHS)
  out = []
  for reading, (lr, _) in best.items():
    hist = next(h for r, h, _ in rows if r.reading == reading and r.lr == lr
                and r.epochs == SCREEN_EPOCHS and r.seed == 0)
    if "blocks" not in hist[0]:
      continue
    if not out:
      out += ["## Per block, at each reading's best learning rate (screen)", "",
              "Effective angular step = mean over an epoch's steps of ‖ΔW_b‖/‖W_b‖ (kernel), "
              "in epoch 1 and in the last epoch before the first decay (epoch 5); factor = the "
              "mean scale-amended factor A_b/m_{b,W} in epoch 5; ‖W_b‖ and E[γ²] at the end of "
              f"training. Blocks 0–{len(hist[0]['blocks']['angular_step']) - 2} are the "
              f"convolutions, {len(hist[0]['blocks']['angular_step']) - 1} the classifier.", ""]
    e1 = hist[0]["blocks"]
    e5 = hist[min(4, len(hist) - 1)]["blocks"]
    last = hist[-1]["blocks"]
    fmt = lambda xs: " ".join("—" if x is None else f"{x:.3g}" for x in xs)
    out += [f"**{READINGS[reading][0]}, lr {lr:g}**", "",
            f"- angular step, epoch 1: {fmt(e1['angular_step'])}",
            f"- angular step, epoch 5: {fmt(e5['angular_step'])}"]
    if "factor" in e5:
      out.append(f"- factor, epoch 5: {fmt(e5['factor'])}")
    out += [f"- ‖W_b‖, end: {fmt(last['w_norm'])}",
            f"- E[γ²], end: {fmt(last['gamma2'])}", ""]
  return out


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save_figure(fig, name: str) -> None:
  """Writes ``OUT/name`` atomically (a reader never sees half a PNG) and closes ``fig``."""
  tmp = OUT / f".{name}.tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, OUT / name)
  _pyplot().close(fig)


def plot(rows) -> None:
  plt = _pyplot()
  best = best_lrs(rows, SCREEN_EPOCHS)
  if not best:
    return
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for reading, (lr, _) in best.items():
    hist = next(h for r, h, _ in rows if r.reading == reading and r.lr == lr
                and r.epochs == SCREEN_EPOCHS and r.seed == 0)
    ep = [h["epoch"] for h in hist]
    kw = dict(color=COLORS.get(reading), label=f"{READINGS[reading][0]}, lr {lr:g}")
    axes[0].plot(ep, [h.get("train_loss") for h in hist], **kw)
    axes[1].plot(ep, [100 * h["val_acc"] for h in hist], **kw)
    if "blocks" in hist[0]:
      mid = hist[min(4, len(hist) - 1)]["blocks"]["angular_step"]
      axes[2].semilogy(range(len(mid)), mid, marker="o", **kw)
  axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss (best lr on val)")
  axes[1].set(xlabel="epoch", ylabel="validation accuracy %", title="validation accuracy")
  axes[2].set(xlabel="block (0 = first conv, last = classifier)",
              ylabel="mean ||dW||/||W|| per step", title="effective angular step, epoch 5")
  axes[1].legend(fontsize=7)
  fig.suptitle(f"{TITLE} width {WIDTH:g}, {SCREEN_EPOCHS} epochs, seed 0 "
               "(screen)")
  fig.tight_layout()
  _save_figure(fig, "curves.png")
  conf = [r for r in rows if r[0].epochs == CONFIRM_EPOCHS and r[2] == "finished"]
  if conf:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for reading, lr in sorted({(r.reading, r.lr) for r, _, _ in conf}):
      hists = [h for r, h, _ in conf if (r.reading, r.lr) == (reading, lr)]
      n = min(len(h) for h in hists)
      ep = list(range(1, n + 1))
      for ax, key, scale in ((axes[0], "train_loss", 1), (axes[1], "test_acc", 100)):
        vals = [[scale * (h[i].get(key) or float("nan")) for h in hists] for i in range(n)]
        c = COLORS.get(reading)
        ax.plot(ep, [statistics.median(v) for v in vals], color=c,
                label=f"{READINGS[reading][0]}, lr {lr:g} ({len(hists)} seeds)")
        ax.fill_between(ep, [min(v) for v in vals], [max(v) for v in vals], color=c, alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test accuracy %", ylim=(40, None))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{TITLE} width {WIDTH:g}, {CONFIRM_EPOCHS} epochs: median "
                 "over seeds, range shaded")
    fig.tight_layout()
    _save_figure(fig, "confirm.png")


def plot_blocks(rows) -> None:
  """``blocks.png``: per block, the effective angular step over training, one panel per
  confirmed reading (seed 0; the screen's best learning rates until a confirmation exists)."""
  plt = _pyplot()
  epochs = CONFIRM_EPOCHS if any(r.epochs == CONFIRM_EPOCHS for r, _, _ in rows) else \
      SCREEN_EPOCHS
  chosen = {(r.reading, r.lr): h for r, h, st in rows
            if r.epochs == epochs and r.seed == 0 and st == "finished" and "blocks" in h[0]}
  if epochs == SCREEN_EPOCHS:
    best = best_lrs(rows, SCREEN_EPOCHS)
    chosen = {k: h for k, h in chosen.items() if best.get(k[0], (None,))[0] == k[1]}
  if not chosen:
    return
  keys = sorted(chosen, key=lambda k: list(READINGS).index(k[0]))
  ncols = min(3, len(keys))
  nrows = -(-len(keys) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.0 * nrows + 0.5), sharey=True,
                           squeeze=False)
  cmap = plt.get_cmap("viridis")
  for ax in axes.flat[len(keys):]:
    ax.set_visible(False)
  for ax, key in zip(axes.flat, keys):
    hist = chosen[key]
    steps = [h["blocks"]["angular_step"] for h in hist]
    n = len(steps[0])
    for b in range(n):
      ax.semilogy([h["epoch"] for h in hist], [s[b] for s in steps], color=cmap(b / max(1, n - 1)),
                  label=f"block {b}" + (" (classifier)" if b == n - 1 else ""))
    ax.set(xlabel="epoch", title=f"{READINGS[key[0]][0]}, lr {key[1]:g}")
  for row in axes:
    row[0].set_ylabel("mean ||dW_b|| / ||W_b|| per step")
  axes.flat[len(keys) - 1].legend(fontsize=7, ncol=2)
  fig.suptitle(f"Effective angular step of each block's kernel ({TITLE} width {WIDTH:g}, "
               f"{epochs} epochs, seed 0): equal across blocks = balanced")
  fig.tight_layout()
  _save_figure(fig, "blocks.png")


def report() -> None:
  sync_results()
  rows = collect()
  if rows:
    write_table(rows)
    plot(rows)
    plot_blocks(rows)


README = REPO / "docs" / "results.md"  # where the committed tables are shown


def readme_markers() -> tuple:
  """The markers in ``docs/results.md`` around the current study's tables."""
  tag = "ablation-table" if DATASET == "cifar10" else f"ablation-table-{DATASET}"
  return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


README_MARKERS = readme_markers()


def update_readme(readme: pathlib.Path = README) -> bool:
  """Puts ``ablation.md``'s screen and confirmation tables between ``docs/results.md``'s
  markers for the current study (:func:`readme_markers`), so that the numbers shown are the
  committed runs'. Returns whether the file changed."""
  import re  # pylint: disable=import-outside-toplevel
  table = (OUT / "ablation.md").read_text()
  start = table.index("## Screen") if "## Screen" in table else None
  if start is None:
    return False
  end = table.find("## Per block", start)
  body = table[start:end if end >= 0 else len(table)].strip()
  body = re.sub(r"^## (.*)$", rf"**\1 ({TITLE[0].lower() + TITLE[1:]} width 1/8).**",
                body, flags=re.M)
  markers = readme_markers()
  text = readme.read_text()
  if markers[0] not in text or markers[1] not in text:
    raise SystemExit(f"error: {os.path.relpath(readme)} has no {markers[0]} ... {markers[1]} "
                     "markers to put the tables between")
  begin, finish = (text.index(m) for m in markers)
  new = (text[:begin + len(markers[0])] + "\n" + body + "\n" + text[finish:])
  if new == text:
    return False
  tmp = readme.with_name(f".{readme.name}.tmp")
  tmp.write_text(new)
  os.replace(tmp, readme)
  return True


def main(argv=None) -> int:
  if str(REPO) not in sys.path:  # run as a script (python train/ablation.py)
    sys.path.insert(0, str(REPO))
  from train import cli  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", choices=tuple(STUDIES), default="cifar10",
                 help="cifar10: VGG11-BN, every reading; cifar100: VGG13-BN, SGD, the default "
                      "scale-amended reading, LARS, LSALR")
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
  use_study(args.dataset, args.data_dir)
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
