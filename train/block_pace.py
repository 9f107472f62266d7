"""Per-block training pace across the learning-rate decays: SGD against scale-amended SGD.

A question the committed runs can answer without training anything: how does each optimizer's
per-block *effective angular step* (the mean over an epoch's steps of ``‖ΔW_b‖ / ‖W_b‖`` for
block ``b``'s kernel, logged by ``train/cifar.py --log-blocks``) change at each step decay of
the learning rate, and when does scale-amended SGD fall behind SGD?

Why it can differ. For a kernel followed by BatchNorm the loss does not depend on the kernel's
norm, so only the angular step moves the function. With weight decay ``λ``, SGD's norms shrink
until the angular step settles near ``√(2ηλ/(1+μ))``: after a ×0.1 decay of ``η`` its angular
step first falls 10×, then climbs back as the norms shrink toward the new equilibrium (at most
to a √10 fall, given time ``~1/(ηλ)`` steps). Scale-amended SGD with weight decay applied before
the scaling has an angular step ``η A_b ‖g̃_b‖ / (s_b n_out)`` that does not depend on the
norm, so it falls 10× at every decay and stays there. This script measures both, per phase of
the schedule, from the run records:

* ``pace``: the median over blocks of the angular step in the last epoch of each phase (and in
  the first epoch after each decay), the spread over blocks (max/min), and the distance each
  optimizer travels per phase (sum over epochs of median step × steps per epoch, radians);
* the training loss and validation accuracy at the end of each phase, which say whether the
  pace difference shows up where it is supposed to matter.

Runs are grouped by reading and learning rate (seeds pooled by their median). The report ends
with the scale-amended factors of a freshly initialized VGG13-BN w1/8 with 10 and with 100
classes (:func:`init_factors`): the classifier's scalar ``m_z`` grows with its number of
outputs and divides every factor below it. Writes ``block_pace.md`` and ``block_pace.png``
into ``--out``.

Example::

  python train/block_pace.py   # the committed CIFAR-10 ablation, CIFAR-100 screen and Table 1 runs
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
from typing import NamedTuple, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(REPO))
from train import atomic  # noqa: E402  pylint: disable=wrong-import-position

RESULTS = REPO / "train" / "results"
OUT = RESULTS / "block_pace"

# (dataset label, results directory, [(label, run-name prefix without the seed)]). The CIFAR-10
# pairs are the ablation's confirmed finalists (30 epochs, 3 seeds); the CIFAR-100 ones are
# filled from the screen's best learning rates on validation (:func:`cifar100_groups`).
CIFAR10 = ("CIFAR-10, VGG11-BN w1/8, 30 epochs", RESULTS / "ablation_cifar10" / "runs",
           [("SGD lr 0.1", "sgd-lr0.1-e30"),
            ("scale-amended lr 0.03 (default reading)", "sa_unscaled-lr0.03-e30"),
            ("scale-amended lr 0.01 (authors' pooling)", "sa_pool_after-lr0.01-e30")])


# Table 1's CIFAR-100 half: 30 epochs on all 50,000 training images, each optimizer at its lr
# chosen in the screen.
CIFAR100_TABLE1 = ("CIFAR-100, VGG13-BN w1/8, 30 epochs (Table 1 runs, no validation split)",
                   RESULTS / "table1_cpu_full_cifar100" / "runs",
                   [("SGD lr 0.1", "cifar100-vgg13-sgd"),
                    ("scale-amended lr 0.1 (default reading)", "cifar100-vgg13-scale_amended")])


class Run(NamedTuple):
  name: str
  config: dict
  history: list

  @property
  def steps_per_epoch(self) -> int:
    c = self.config
    n = c["data"]["train_images"] - (c.get("val_split") or 0)
    if c.get("train_subset"):
      n = min(n, c["train_subset"])
    return n // c["batch_size"]  # the trainer drops the last partial batch


def read_run(runs_dir: pathlib.Path, name: str) -> Optional[Run]:
  cfg, met = runs_dir / f"{name}.config.json", runs_dir / f"{name}.metrics.jsonl"
  if not (cfg.exists() and met.exists()):
    return None
  with open(met) as f:
    hist = [json.loads(line) for line in f if line.strip()]
  if not hist or "blocks" not in hist[0] or hist[-1].get("diverged"):
    return None
  if hist[-1]["epoch"] != json.loads(cfg.read_text())["epochs"]:
    return None  # unfinished
  return Run(name, json.loads(cfg.read_text()), hist)


def phases(history: list) -> list:
  """``[(first_epoch, last_epoch, lr)]``: maximal stretches of epochs with one learning rate
  (the epoch record's ``lr`` is the rate at the epoch's start, the rate throughout when
  the decays fall on epoch boundaries, as in every run read here)."""
  out = []
  for h in history:
    lr = round(h["lr"], 12)
    if out and out[-1][2] == lr:
      out[-1] = (out[-1][0], h["epoch"], lr)
    else:
      out.append((h["epoch"], h["epoch"], lr))
  return out


def _median_step(h: dict) -> float:
  return statistics.median(x for x in h["blocks"]["angular_step"] if x is not None)


def pace(run: Run) -> list:
  """Per phase: median-block angular step in its first and last epoch, the blocks' spread in
  its last epoch, the radians travelled (median block), training loss and validation accuracy
  at its end."""
  by_epoch = {h["epoch"]: h for h in run.history}
  rows = []
  for first, last, lr in phases(run.history):
    steps = [x for x in by_epoch[last]["blocks"]["angular_step"] if x is not None]
    rows.append({
        "epochs": (first, last), "lr": lr,
        "first": _median_step(by_epoch[first]), "last": _median_step(by_epoch[last]),
        "spread": max(steps) / min(steps),
        "travel": sum(_median_step(by_epoch[e]) for e in range(first, last + 1))
                  * run.steps_per_epoch,
        "train_loss": by_epoch[last].get("train_loss"),
        "val_acc": by_epoch[last].get("val_acc"),
        # Runs trained on the whole training set (Table 1) have no validation split.
        "test_acc": by_epoch[last].get("test_acc"),
    })
  return rows


def group_pace(runs: list) -> list:
  """:func:`pace` of each seed, each number the median over seeds."""
  per = [pace(r) for r in runs]
  n = min(len(p) for p in per)
  out = []
  for k in range(n):
    row = dict(per[0][k])
    for key in ("first", "last", "spread", "travel", "train_loss", "val_acc", "test_acc"):
      vals = [p[k][key] for p in per if p[k][key] is not None]
      row[key] = statistics.median(vals) if vals else None
    out.append(row)
  return out


def cifar100_groups(runs_dir: pathlib.Path) -> list:
  """The CIFAR-100 screen's best learning rate on validation for SGD and the default
  scale-amended reading (seed 0, 10 epochs)."""
  best = {}
  for cfg in runs_dir.glob("*-e10-s0.config.json"):
    name = cfg.name[:-len(".config.json")]
    reading = name.split("-lr")[0]
    if reading not in ("sgd", "sa_unscaled"):
      continue
    run = read_run(runs_dir, name)
    if run is None:
      continue
    acc = run.history[-1]["val_acc"]
    if reading not in best or acc > best[reading][1]:
      best[reading] = (name[:-len("-s0")], acc, run.config["lr"])
  labels = {"sgd": "SGD", "sa_unscaled": "scale-amended (default reading)"}
  return [(f"{labels[r]} lr {best[r][2]:g}", best[r][0]) for r in ("sgd", "sa_unscaled")
          if r in best]


def collect(studies) -> list:
  """``[(dataset label, [(label, [Run, ...]), ...])]`` for the groups that have finished runs."""
  out = []
  for title, runs_dir, groups in studies:
    found = []
    for label, prefix in groups:
      runs = [r for r in (read_run(runs_dir, f"{prefix}-s{s}") for s in range(10)) if r]
      if runs:
        found.append((label, runs))
    if found:
      out.append((title, found))
  return out


def init_factors(model: str = "vgg13", num_classes: int = 10, width: float = 0.125,
                 seed: int = 0) -> list:
  """The default scale-amended factor of each block's kernel (block order, the classifier
  last) for a freshly initialized ``train.models`` model."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import optax_bm  # pylint: disable=import-outside-toplevel
  from train import models  # pylint: disable=import-outside-toplevel
  net = models.create(model, num_classes, width=width, rngs=nnx.Rngs(seed))
  specs = optax_bm.annotate(net, jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32))
  factors = optax_bm.block_scales(specs, nnx.state(net, nnx.Param))
  is_spec = lambda x: isinstance(x, optax_bm.LayerSpec)  # noqa: E731
  kernels = [(spec.block, float(f)) for spec, f in zip(
      jax.tree_util.tree_leaves(specs, is_leaf=is_spec), jax.tree_util.tree_leaves(factors))
      if is_spec(spec) and spec.is_kernel]
  return [f for _, f in sorted(kernels)]


def _init_factor_lines() -> list:
  rows = {n: init_factors(num_classes=n) for n in (10, 100)}
  med = {n: statistics.median(f[:-1]) for n, f in rows.items()}
  return ["## Factors at initialization: 10 against 100 classes", "",
          "Default scale-amended factor of each kernel (`optax_bm.block_scales`), VGG13-BN w1/8, "
          "seed 0, conv blocks 0–9 then the classifier (factor 1 by construction).", "",
          "| classes | " + " | ".join(str(b) for b in range(len(rows[10]))) + " | median conv |",
          "|---|" + "---|" * (len(rows[10]) + 1)] + [
              f"| {n} | " + " | ".join(f"{x:.3g}" for x in f) + f" | {med[n]:.3g} |"
              for n, f in rows.items()] + [
          "", f"With 100 classes every conv block's factor is {med[10] / med[100]:.1f}× smaller "
          "relative to the classifier's.", ""]


def _e(x) -> str:
  return "—" if x is None else f"{x:.2e}"


def write_report(collected: list, path: pathlib.Path, with_init_factors: bool = False) -> str:
  lines = [
      "# Per-block pace across the learning-rate decays",
      "",
      "Generated by `python train/block_pace.py` from the committed run records (`--log-blocks`). "
      "Angular step = mean over an epoch's steps of ‖ΔW_b‖/‖W_b‖ of a block's kernel; *median* "
      "= the median block; *spread* = largest/smallest block; *travel* = radians the median "
      "block moves in the phase (sum of its steps). Each number is the median over the seeds "
      "shown. *Fall at the decay* = last epoch before it / first epoch after it; *with "
      "recovery* = last epoch before it / last epoch of the next phase.",
      "",
  ]
  for title, groups in collected:
    lines += [f"## {title}", "",
              "| optimizer | seeds | phase (epochs) | lr | median step, first → last epoch | "
              "spread | travel | train loss | val acc % (test acc % without a validation split) |",
              "|---|---|---|---|---|---|---|---|---|"]
    summaries = {}
    for label, runs in groups:
      rows = group_pace(runs)
      summaries[label] = rows
      for k, r in enumerate(rows):
        lines.append(
            f"| {label if k == 0 else ''} | {len(runs) if k == 0 else ''} | "
            f"{r['epochs'][0]}–{r['epochs'][1]} | {r['lr']:g} | {_e(r['first'])} → "
            f"{_e(r['last'])} | {r['spread']:.1f}× | {r['travel']:.2f} | "
            f"{r['train_loss']:.3f} | " + (f"{100 * r['val_acc']:.2f}" if r["val_acc"] is not None
                                           else f"(test {100 * r['test_acc']:.2f})") + " |")
    lines += ["", "| optimizer | decay | fall at the decay | with recovery |", "|---|---|---|---|"]
    for label, rows in summaries.items():
      for k in range(len(rows) - 1):
        lines.append(f"| {label} | {k + 1} | {rows[k]['last'] / rows[k + 1]['first']:.1f}× | "
                     f"{rows[k]['last'] / rows[k + 1]['last']:.1f}× |")
    labels = list(summaries)
    if len(labels) >= 2:
      base = summaries[labels[0]]
      lines += ["", f"Pace of each optimizer relative to {labels[0]} (median block, last epoch "
                "of each phase; < 1 = slower):", "",
                "| optimizer | " + " | ".join(f"phase {k + 1}" for k in range(len(base))) + " |",
                "|---|" + "---|" * len(base)]
      for label in labels[1:]:
        rows = summaries[label]
        n = min(len(rows), len(base))
        lines.append(f"| {label} | " + " | ".join(
            f"{rows[k]['last'] / base[k]['last']:.2f}" for k in range(n)) + " |")
    lines.append("")
  if with_init_factors:
    lines += _init_factor_lines()
  text = "\n".join(lines) + "\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(path, text)
  return text


def plot(collected: list, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(collected), figsize=(6.5 * len(collected), 4.5), squeeze=False)
  colors = ("tab:blue", "tab:green", "tab:purple", "tab:red")
  for ax, (title, groups) in zip(axes[0], collected):
    for color, (label, runs) in zip(colors, groups):
      run = runs[0]  # seed 0: one run's blocks, not a median of medians
      ep = [h["epoch"] for h in run.history]
      steps = [[x for x in h["blocks"]["angular_step"] if x is not None] for h in run.history]
      ax.semilogy(ep, [statistics.median(s) for s in steps], color=color, label=label)
      ax.fill_between(ep, [min(s) for s in steps], [max(s) for s in steps], color=color,
                      alpha=0.15)
    ax.set(xlabel="epoch", ylabel="angular step per step, ‖ΔW_b‖/‖W_b‖", title=title)
    ax.legend(fontsize=7)
  fig.suptitle("Effective angular step of the blocks' kernels: median block (line) and range "
               "over blocks (shaded), seed 0")
  fig.tight_layout()
  atomic.save_figure(fig, path)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.relpath(OUT),
                 help="directory for block_pace.md and block_pace.png")
  p.add_argument("--no-plot", action="store_true", help="the table only")
  args = p.parse_args(argv)
  c100 = RESULTS / "ablation_cifar100" / "runs"
  studies = [CIFAR10, ("CIFAR-100, VGG13-BN w1/8, 10 epochs (screen, best lr on validation)",
                       c100, cifar100_groups(c100)), CIFAR100_TABLE1]
  collected = collect(studies)
  if not collected:
    print("error: no finished run records with --log-blocks found under "
          f"{os.path.relpath(RESULTS)}", file=sys.stderr)
    return 1
  out = pathlib.Path(args.out)
  print(write_report(collected, out / "block_pace.md", with_init_factors=True))
  if not args.no_plot:
    plot(collected, out / "block_pace.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
