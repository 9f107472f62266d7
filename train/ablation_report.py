"""The ablation's results (``train/ablation.py`` runs the grid): ``ablation.md``,
``curves.png``, ``confirm.png`` and ``blocks.png`` from the runs recorded in a study's
``runs/``, and the tables shown in ``docs/results.md``.

What depends on the study (output directory, readings, title, dataset) is passed in;
``train/ablation.py`` passes its current study's.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
from typing import NamedTuple

from train import atomic

# The protocol the tables describe (``train/ablation.py`` runs it).
VAL_SPLIT = 5000
WIDTH, BATCH = 0.125, 128
SCREEN_EPOCHS, CONFIRM_EPOCHS = 10, 30
COLORS = {"sgd": "tab:blue", "lars": "tab:orange", "lsalr": "tab:olive", "sa_v1": "tab:red",
          "sa_unscaled": "tab:green", "sa_pool_after": "tab:purple",
          "sa_pool_effective": "tab:brown", "sa_gamma": "tab:pink", "sa_decay_after": "tab:gray",
          "sgd_he": "tab:blue", "sa_propagated": "tab:green", "sa_unit": "tab:red",
          "sa_propagated_gamma": "tab:purple"}


class Run(NamedTuple):
  """One run of the grid; :attr:`name` is its work directory's and records' name."""
  reading: str
  lr: float
  epochs: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.reading}-lr{self.lr:g}-e{self.epochs}-s{self.seed}"


def read_metrics(path: pathlib.Path) -> list:
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def non_finite_epoch(history: list):
  """The first epoch whose logged kernel norms (``--log-blocks``) are non-finite, i.e. whose
  parameters were; None if none. Records from before the trainer checked its parameters (it
  now stops such a run as diverged) can show a finite loss and chance accuracy for such a run,
  since XLA:CPU's fused ReLU-then-mean maps NaN to 0."""
  for rec in history:
    norms = (rec.get("blocks") or {}).get("w_norm") or ()
    if any(x is None or not math.isfinite(x) for x in norms):
      return rec.get("epoch")
  return None


def status(history: list, epochs: int) -> str:
  if history and (history[-1].get("diverged") or non_finite_epoch(history) is not None):
    return "diverged"
  if history and history[-1].get("epoch") == epochs:
    return "finished"
  return "unfinished" if history else "not started"


def diverged_at(history: list):
  """The epoch a diverged run diverged in: its first with non-finite parameters, else its last."""
  first = non_finite_epoch(history)
  return history[-1].get("epoch") if first is None else first


def collect(out: pathlib.Path) -> list:
  """Every run recorded in ``out/runs/``, as (run, metrics history, status)."""
  rows = []
  for cfg in sorted(out.glob("runs/*.config.json")):
    name = cfg.name[:-len(".config.json")]
    reading, lr, epochs, seed = name.rsplit("-", 3)
    hist = read_metrics(out / "runs" / f"{name}.metrics.jsonl")
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


def _run_configs(out: pathlib.Path) -> list:
  """The recorded runs' ``config.json`` contents, in file-name order."""
  return [json.loads(cfg.read_text()) for cfg in sorted(out.glob("runs/*.config.json"))]


def run_width(out: pathlib.Path) -> float:
  """The width the study's recorded runs were trained at (``WIDTH`` before any run)."""
  widths = {c.get("width", WIDTH) for c in _run_configs(out)}
  if len(widths) > 1:
    raise ValueError(f"{out}/runs holds runs of several widths {sorted(widths)}: one study, "
                     "one width")
  return widths.pop() if widths else WIDTH


def width_label(width: float) -> str:
  """0.125 -> "1/8", 0.25 -> "1/4", 1 -> "1"."""
  inverse = 1 / width
  return f"1/{round(inverse)}" if width < 1 and abs(inverse - round(inverse)) < 1e-9 \
      else f"{width:g}"


_OPTIMIZER_NAMES = {"sgd": "SGD", "lars": "LARS", "lsalr": "LSALR",
                    "scale_amended": "scale-amended"}


def _weight_decays(out: pathlib.Path) -> str:
  """The recorded runs' weight decay per optimizer, e.g. "SGD/LARS 1e-3, scale-amended 5e-3"."""
  by_value: dict = {}
  for c in _run_configs(out):
    if "optimizer" not in c or "weight_decay" not in c:
      continue
    name = _OPTIMIZER_NAMES.get(c["optimizer"], c["optimizer"])
    names = by_value.setdefault(c["weight_decay"], [])
    if name not in names:
      names.append(name)
  order = list(_OPTIMIZER_NAMES.values())
  groups = sorted(by_value.items(), key=lambda kv: min(order.index(n) if n in order else 99
                                                         for n in kv[1]))
  return ", ".join("/".join(sorted(names, key=lambda n: order.index(n) if n in order else 99))
                   + f" {_sci(wd)}" for wd, names in groups)


def _sci(x: float) -> str:
  """0.001 -> "1e-3", 0.005 -> "5e-3", 0 -> "0"."""
  if x == 0:
    return "0"
  mantissa, exponent = f"{x:e}".split("e")
  return f"{float(mantissa):g}e{int(exponent)}"


def write_table(rows, out: pathlib.Path, readings: dict, title: str) -> str:
  """Writes ``out/ablation.md`` from ``rows`` (:func:`collect`) and returns its text."""
  weight_decays = _weight_decays(out)
  lines = [
      f"# Does scale-amended SGD beat SGD? Ablation on the {title.split(',')[0].replace('Full', 'full')}",
      "",
      f"{title.split(', ')[1]} width {run_width(out):g}, batch {BATCH}, step decay (x0.1 at 50% and 75%), Nesterov "
      f"momentum 0.9, float32, CPU. Training on 45,000 images; the last {VAL_SPLIT:,} training "
      "images are a held-out validation split (choices are made on it); test = the official "
      "10,000 test images (reported, never used to choose). Final-epoch numbers. "
      + (f"Weight decay: {weight_decays} (as recorded in the runs' configs). "
         if weight_decays else "")
      + "Generated by `python train/ablation.py --report-only` from `runs/`.",
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
                "`div` = training loss or parameters turned non-finite (run stopped); the best "
                "learning rate of each reading on validation in bold.", ""]
      lines += ["| reading | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
      best = best_lrs(rows, epochs)
      for reading, (label, _) in readings.items():
        cells, any_run = [], False
        for lr in lrs:
          match = [r for r in sel if r[0].reading == reading and r[0].lr == lr]
          if not match:
            cells.append("")
            continue
          any_run = True
          _, hist, st = match[0]
          if st == "diverged":
            cells.append(f"div (ep {diverged_at(hist)})")
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
      lines += ["Median [min–max] over the finished seeds of the final-epoch accuracy %, best "
                "median validation accuracy first; a seed whose run diverged is counted under "
                "seeds and left out of the medians.", "",
                "| reading | lr | seeds | validation | test | train loss |", "|---|---|---|---|---|---|"]
      groups = {}
      for r in sel:
        if r[2] in ("finished", "diverged"):
          groups.setdefault((r[0].reading, r[0].lr), []).append(r)
      fin = {k: [r for r in g if r[2] == "finished"] for k, g in groups.items()}
      order = sorted(groups, key=lambda k: -statistics.median(
          [_final(h, "val_acc") or 0.0 for _, h, _ in fin[k]] or [0.0]))
      for reading, lr in order:
        done, n_div = fin[(reading, lr)], len(groups[(reading, lr)]) - len(fin[(reading, lr)])
        seeds = f"{len(done) + n_div}" + (f" ({n_div} diverged)" if n_div else "")
        loss = (f"{statistics.median(_final(h, 'train_loss') or float('nan') for _, h, _ in done):.3f}"
                if done else "—")
        lines.append(f"| {readings[reading][0]} | {lr:g} | {seeds} | "
                     f"{_spread([_final(h, 'val_acc') for _, h, _ in done])} | "
                     f"{_spread([_final(h, 'test_acc') for _, h, _ in done])} | {loss} |")
      lines.append("")
  lines += _block_table(rows, readings)
  text = "\n".join(lines) + "\n"
  atomic.write_text(out / "ablation.md", text)
  return text


def _block_table(rows, readings: dict) -> list:
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
    out += [f"**{readings[reading][0]}, lr {lr:g}**", "",
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


def _save_figure(fig, out: pathlib.Path, name: str) -> None:
  """Writes ``out/name`` atomically (a reader never sees half a PNG) and closes ``fig``."""
  atomic.save_figure(fig, out / name)
  _pyplot().close(fig)


def plot(rows, out: pathlib.Path, readings: dict, title: str) -> None:
  """``curves.png`` (the screen at each reading's best learning rate) and, once a confirmation
  exists, ``confirm.png``."""
  plt = _pyplot()
  best = best_lrs(rows, SCREEN_EPOCHS)
  if not best:
    return
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for reading, (lr, _) in best.items():
    hist = next(h for r, h, _ in rows if r.reading == reading and r.lr == lr
                and r.epochs == SCREEN_EPOCHS and r.seed == 0)
    ep = [h["epoch"] for h in hist]
    kw = dict(color=COLORS.get(reading), label=f"{readings[reading][0]}, lr {lr:g}")
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
  fig.suptitle(f"{title} width {run_width(out):g}, {SCREEN_EPOCHS} epochs, seed 0 "
               "(screen)")
  fig.tight_layout()
  _save_figure(fig, out, "curves.png")
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
                label=f"{readings[reading][0]}, lr {lr:g} ({len(hists)} seeds)")
        ax.fill_between(ep, [min(v) for v in vals], [max(v) for v in vals], color=c, alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test accuracy %", ylim=(40, None))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{title} width {run_width(out):g}, {CONFIRM_EPOCHS} epochs: median "
                 "over seeds, range shaded")
    fig.tight_layout()
    _save_figure(fig, out, "confirm.png")


def plot_blocks(rows, out: pathlib.Path, readings: dict, title: str) -> None:
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
  keys = sorted(chosen, key=lambda k: list(readings).index(k[0]))
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
    ax.set(xlabel="epoch", title=f"{readings[key[0]][0]}, lr {key[1]:g}")
  for row in axes:
    row[0].set_ylabel("mean ||dW_b|| / ||W_b|| per step")
  axes.flat[len(keys) - 1].legend(fontsize=7, ncol=2)
  fig.suptitle(f"Effective angular step of each block's kernel ({title} width {run_width(out):g}, "
               f"{epochs} epochs, seed 0): equal across blocks = balanced")
  fig.tight_layout()
  _save_figure(fig, out, "blocks.png")



def write_report(rows, out: pathlib.Path, readings: dict, title: str) -> None:
  """``ablation.md`` and the figures from ``rows`` (:func:`collect`) into ``out``."""
  write_table(rows, out, readings, title)
  plot(rows, out, readings, title)
  plot_blocks(rows, out, readings, title)


def readme_markers(study: str) -> tuple:
  """The markers in ``docs/results.md`` around a study's tables (``train/ablation.py``'s
  ``STUDIES`` names them: "cifar10", "cifar100", "cifar10-resnet20")."""
  tag = "ablation-table" if study == "cifar10" else f"ablation-table-{study}"
  return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def update_readme(readme: pathlib.Path, out: pathlib.Path, title: str, study: str) -> bool:
  """Puts ``ablation.md``'s screen and confirmation tables between ``docs/results.md``'s
  markers for ``study`` (:func:`readme_markers`), so that the numbers shown are the
  committed runs'. Returns whether the file changed."""
  import re  # pylint: disable=import-outside-toplevel
  table = (out / "ablation.md").read_text()
  start = table.index("## Screen") if "## Screen" in table else None
  if start is None:
    return False
  end = table.find("## Per block", start)
  body = table[start:end if end >= 0 else len(table)].strip()
  label = f"{title[0].lower() + title[1:]} width {width_label(run_width(out))}"
  body = re.sub(r"^## (.*)$", rf"**\1 ({label}).**",
                body, flags=re.M)
  markers = readme_markers(study)
  text = readme.read_text()
  if markers[0] not in text or markers[1] not in text:
    raise SystemExit(f"error: {os.path.relpath(readme)} has no {markers[0]} ... {markers[1]} "
                     "markers to put the tables between")
  begin, finish = (text.index(m) for m in markers)
  new = (text[:begin + len(markers[0])] + "\n" + body + "\n" + text[finish:])
  if new == text:
    return False
  atomic.write_text(readme, new)
  return True
