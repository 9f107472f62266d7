"""The Table 1 grid's figures: ``curves.png`` (every seed), ``figure1.png`` (the paper's
Figure 1 style) and ``blocks.png`` (each block's angular step, SGD beside scale-amended SGD)."""

from __future__ import annotations

import pathlib
import statistics

from train import atomic
from train.table1_report import CPU_PRESETS, OPT_COLORS, OPT_LABELS, is_diverged


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
        hist = [h for h in hist if isinstance(h.get("test_acc"), (int, float))]
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
  elif args.preset in CPU_PRESETS:
    sup += f" (CPU scale: width {args.width:g}, {args.epochs} epochs)"
  fig.suptitle(sup, fontsize=10)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


_save_figure = atomic.save_figure


def curve_band(runs: dict, key: str, scale: float = 1.0):
  """Median and min-max over seeds of metric ``key`` per epoch.

  ``runs`` is ``{seed: history}``; only epochs that every seed has, with ``key`` present and
  finite, count. Returns (epochs, median, lo, hi) lists, empty when no epoch qualifies.
  """
  per_epoch: dict = {}
  for hist in runs.values():
    for h in hist:
      v = h.get(key)
      if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
        per_epoch.setdefault(h["epoch"], []).append(scale * v)
  epochs = sorted(e for e, vs in per_epoch.items() if len(vs) == len(runs))
  return (epochs, [statistics.median(per_epoch[e]) for e in epochs],
          [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs])


def plot_figure1(args, results: dict, path: pathlib.Path) -> None:
  """The paper's Figure 1 style: per (dataset, model) a row of two panels, training loss and
  test accuracy per epoch; per optimizer the median over seeds, its seeds' min-max shaded."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = [(d, m) for d in args.datasets for m in args.models]
  fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows) + 0.6), squeeze=False)
  panels = (("train_loss", 1.0, "training loss", "log"), ("test_acc", 100.0,
                                                          "test accuracy (%)", "linear"))
  for r, (d, m) in enumerate(rows):
    for c, (key, scale, ylabel, yscale) in enumerate(panels):
      ax = axes[r, c]
      for o in args.optimizers:
        runs = {s: h for s, h in results.get((d, m, o), {}).items() if not is_diverged(h)}
        if not runs:
          continue
        epochs, med, lo, hi = curve_band(runs, key, scale)
        if not epochs:
          continue
        ax.plot(epochs, med, color=OPT_COLORS[o], lw=1.4,
                label=f"{OPT_LABELS[o]} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.fill_between(epochs, lo, hi, color=OPT_COLORS[o], alpha=0.2, lw=0)
      ax.set_title(f"{'C10' if d == 'cifar10' else 'C100'} {m.upper()}-BN: {ylabel}",
                   fontsize=9)
      ax.set_xlabel("epoch", fontsize=8)
      ax.set_ylabel(ylabel, fontsize=8)
      if ax.lines and yscale == "log":
        ax.set_yscale("log")
      ax.tick_params(labelsize=7, which="both")
      ax.grid(alpha=0.3, which="both")
      if ax.lines:
        ax.legend(fontsize=7)
  sup = (f"Median over seeds, seeds' min-max shaded; width {args.width:g}, {args.epochs} "
         f"epochs, batch {args.batch_size}")
  if args.mini:
    sup += " (mini run on a CIFAR subset; says nothing about full CIFAR)"
  elif args.preset in CPU_PRESETS:
    sup += " (CPU scale; the paper: full width, 200 epochs)"
  fig.suptitle(sup, fontsize=10)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def plot_blocks(args, results: dict, path: pathlib.Path) -> None:
  """Per (dataset, model), one panel per optimizer whose runs logged blocks (``--log-blocks``):
  each block's effective angular step ‖ΔW_b‖/‖W_b‖ per epoch, median over seeds. Equal lines =
  balanced blocks; the question the figure answers is whether scale-amended SGD is."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = []
  for d in args.datasets:
    for m in args.models:
      for o in args.optimizers:
        runs = {s: h for s, h in results.get((d, m, o), {}).items()
                if not is_diverged(h) and h and "blocks" in h[0]}
        if runs:
          panels.append((d, m, o, runs))
  if not panels:
    return
  ncols = min(2, len(panels))
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.8 * ncols, 4.0 * nrows + 0.6),
                           sharey=True, squeeze=False)
  cmap = plt.get_cmap("viridis")
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  for ax, (d, m, o, runs) in zip(axes.flat, panels):
    n = len(next(iter(runs.values()))[0]["blocks"]["angular_step"])
    for b in range(n):
      per_seed = {s: [{"epoch": h["epoch"], "x": h["blocks"]["angular_step"][b]} for h in hist]
                  for s, hist in runs.items()}
      epochs, med, lo, hi = curve_band(per_seed, "x")
      color = cmap(b / max(1, n - 1))
      ax.semilogy(epochs, med, color=color, lw=1.2,
                  label=f"block {b}" + (" (classifier)" if b == n - 1 else ""))
      if len(runs) > 1:
        ax.fill_between(epochs, lo, hi, color=color, alpha=0.12, lw=0)
    ax.set_title(f"{'C10' if d == 'cifar10' else 'C100'} {m.upper()}-BN, {OPT_LABELS[o]} "
                 f"({len(runs)} seed{'s' if len(runs) > 1 else ''})", fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.tick_params(labelsize=7, which="both")
    ax.grid(alpha=0.3, which="both")
  for row in axes:
    row[0].set_ylabel("mean ‖ΔW_b‖/‖W_b‖ per step", fontsize=8)
  axes.flat[len(panels) - 1].legend(fontsize=6, ncol=2)
  fig.suptitle("Effective angular step of each block's kernel, median over seeds (range "
               f"shaded); width {args.width:g}, {args.epochs} epochs: equal lines = balanced",
               fontsize=9)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)
