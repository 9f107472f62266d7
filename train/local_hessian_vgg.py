"""Local-Hessian analysis (b) of ``train/local_hessian.py``: for every block of a VGG-BN, the
scalars of docs/method.md#3-scalar-local-hessians against the measured mean eigenvalues, at
initialization and at trained checkpoints (see that module's docstring)."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_bm
from optax_bm import backmatching
from optax_bm import hessian as hs
from optax_bm.specs import LayerSpec
from train.local_hessian import _g, checkpoint_names, describe_run, log

# ----------------------------------------------------------------------------------------------
# (b) VGG-BN: the scalars against the measured mean eigenvalue, per block
# ----------------------------------------------------------------------------------------------


class CheckpointUnavailable(Exception):
  pass


def load_checkpoint(workdir: str):
  """(model name, width, num_classes, params pure dict, epoch) from a train/cifar.py workdir."""
  try:
    from train import records, state as state_lib
  except Exception as e:  # the trainer may not exist yet or fail to import
    raise CheckpointUnavailable(f"the trainer (train/) cannot be imported ({type(e).__name__}: {e})")
  needed = ((records, "load_config"), (records, "checkpoint_manager"),
            (state_lib, "create_train_state"), (records, "restore_checkpoint"))
  missing = [n for module, n in needed if not hasattr(module, n)]
  if missing:
    raise CheckpointUnavailable(f"the trainer has no {', '.join(missing)}: the checkpoint "
                                "format this script reads is not available")
  try:
    config = records.load_config(workdir)
    mngr = records.checkpoint_manager(workdir)
    epoch = mngr.latest_step()
    if epoch is None:
      raise CheckpointUnavailable(f"no checkpoint in {workdir}")
    num_classes = 100 if config.dataset == "cifar100" else 10
    _, state = state_lib.create_train_state(config, num_classes, 1)
    state, _ = records.restore_checkpoint(mngr, state, epoch)
    mngr.close()
  except CheckpointUnavailable:
    raise
  except Exception as e:
    raise CheckpointUnavailable(f"cannot restore {workdir} ({type(e).__name__}: {e})")
  return config.model, float(config.width), num_classes, jax.device_get(state["params"]), \
      int(epoch), config.optimizer


def build_vgg(name: str, width: float, num_classes: int, seed: int, params=None):
  from flax import nnx
  from train import models
  model = models.vgg(name, num_classes, width=width, rngs=nnx.Rngs(seed))
  if params is not None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
  model.train()
  return model


def vgg_blocks(model):
  modules = list(model.blocks) + [model.classifier]
  fns, params = backmatching.nnx_blocks(modules)
  return fns, params


def measure_vgg(model, images, key, samples: int):
  specs = optax_bm.annotate(model, images)
  fns, params = vgg_blocks(model)
  block_specs = [specs["blocks"][i] for i in range(len(model.blocks))] + [specs["classifier"]]
  rows, z = [], images
  for b, (fn, p, sp) in enumerate(zip(fns, params, block_specs)):
    t0 = time.time()
    cmp = hs.compare_with_scalars(fn, p, z, sp, jax.random.fold_in(key, b),
                                  num_samples=samples)
    kspec = [s for s in jax.tree.leaves(sp, is_leaf=lambda s: isinstance(s, LayerSpec))
             if s.is_kernel][0]
    offset_path = "bn/bias" if "bn/bias" in cmp.mean_a else "bias"
    rows.append(dict(block=b, kind=kspec.kind, s=kspec.s, c=kspec.c,
                     normalized=kspec.normalized, dim_w=cmp.dim_w, dim_z=cmp.dim_z,
                     m_w=float(cmp.m_w), mean_w=float(cmp.mean_w), se_w=float(cmp.mean_w_stderr),
                     m_z=float(cmp.m_z), mean_z=float(cmp.mean_z), se_z=float(cmp.mean_z_stderr),
                     m_a=float(cmp.m_a), offset_path=offset_path,
                     mean_offset=float(cmp.mean_a.get(offset_path, float("nan"))),
                     mean_a={k: float(v) for k, v in cmp.mean_a.items()},
                     gamma_sq=_mean_gamma_sq(p), z_sq=float(jnp.mean(jnp.square(z)))))
    log(f"(b) block {b} ({kspec.kind}, s={kspec.s}, c={kspec.c:g}): mean(H_W)/m_W="
        f"{rows[-1]['mean_w'] / rows[-1]['m_w']:.3f}, mean(H_z)/m_z="
        f"{rows[-1]['mean_z'] / rows[-1]['m_z']:.3f} ({time.time() - t0:.0f}s)")
    z = jax.jit(fn)(p, z)
  return rows


def _mean_gamma_sq(params) -> float:
  """Mean of BatchNorm's γ² in a block's parameters (nan without BatchNorm)."""
  from optax_bm.specs import path_str
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path_str(path).endswith("bn/scale"):
      return float(jnp.mean(jnp.square(leaf)))
  return float("nan")


def _ratio(x):
  return f"{x:.3g}"


def vgg_markdown(results, args, title) -> str:
  lines = [
      f"## (b) {title}: scalar local Hessians vs. measured mean eigenvalue, per block", "",
      f"Batch of {args.batch_size} real {args.dataset.upper().replace('CIFAR', 'CIFAR-')} "
      "images, BatchNorm on batch statistics, float32. "
      f"Measured: tr(H)/dim by Hutchinson ({args.samples} Rademacher vectors, ± one standard "
      "error); H_W is the kernel's block of H_θ = J_θᵀJ_θ/N, H_z = J_zᵀJ_z over the whole batch; "
      "the offset column is the exact mean eigenvalue of the BatchNorm offset's block (the "
      "classifier's bias for the last block) against m_a = s. E[z²]: second moment of the "
      "block's input; E[γ²]: mean squared BatchNorm scale, which the scalars ignore "
      "(H_W, H_z and the offset's block all scale with γ²). The top block (classifier) is "
      "measured with identity loss curvature, as `docs/method.md#3-scalar-local-hessians` "
      "takes it. ratio = measured / scalar (1 = the scalar is the mean eigenvalue).", ""]
  for label, rows in results:
    lines += [f"### {label}", "",
              "| block | kind | s | c | E[z²] | E[γ²] | m_W | mean(H_W) | ratio W | m_z | "
              "mean(H_z) | ratio z | m_a | mean(H_offset) | ratio a |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      gamma = "–" if math.isnan(r["gamma_sq"]) else _g(r["gamma_sq"])
      lines.append(
          f"| {r['block']} | {r['kind']}{'+BN' if r['normalized'] else ''} | {r['s']} | "
          f"{r['c']:g} | {_g(r['z_sq'])} | {gamma} | {_g(r['m_w'])} | {_g(r['mean_w'])} ± "
          f"{_g(r['se_w'], 2)} | {_ratio(r['mean_w'] / r['m_w'])} | {_g(r['m_z'])} | "
          f"{_g(r['mean_z'])} ± {_g(r['se_z'], 2)} | {_ratio(r['mean_z'] / r['m_z'])} | "
          f"{_g(r['m_a'])} | {_g(r['mean_offset'])} | {_ratio(r['mean_offset'] / r['m_a'])} |")
    lines.append("")
  return "\n".join(lines) + "\n"


def plot_vgg(results, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
  colors = ["C0", "C3", "C2", "C1", "C4"]
  for (label, rows), color in zip(results, colors):
    b = np.array([r["block"] for r in rows])
    for ax, key in ((axes[0], "w"), (axes[1], "z")):
      m = np.array([r[f"m_{key}"] for r in rows])
      mean = np.array([r[f"mean_{key}"] for r in rows])
      se = np.array([r[f"se_{key}"] for r in rows])
      ax.plot(b, m, "--", color=color, alpha=0.8)
      ax.errorbar(b, mean, yerr=se, fmt="o-", ms=4, color=color)
      axes[2].plot(b, mean / m, "o-" if key == "w" else "s:", ms=4, color=color)
  for ax, name in ((axes[0], "H_W (kernel)"), (axes[1], "H_z (block input)")):
    ax.set_title(f"{name}: measured tr/dim (solid) vs scalar (dashed)", fontsize=10)
  axes[2].axhline(1.0, color="k", lw=0.8)
  axes[2].set_title("measured / scalar: H_W (solid, o), H_z (dotted, s)", fontsize=10)
  for ax in axes:
    ax.set_yscale("log")
    ax.set_xlabel("block (0 = first conv, last = classifier)")
    ax.grid(alpha=0.3, which="both")
  handles = [Line2D([], [], color=c, marker="o", label=label)
             for (label, _), c in zip(results, colors)]
  fig.legend(handles=handles, loc="lower center", ncol=len(results), fontsize=9)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def part_vgg(args, images, out_dir: str) -> str:
  name, width, num_classes, notes = args.model, args.width, 10, []
  trained = []
  names = checkpoint_names(args)
  for workdir in args.checkpoint or []:
    shown = names[workdir]
    try:
      ck_name, ck_width, ck_classes, params, epoch, opt = load_checkpoint(workdir)
    except CheckpointUnavailable as e:
      notes.append(f"**Checkpoint {shown} not analysed:** {str(e).replace(workdir, shown)}.")
      log(f"(b) {notes[-1]}")
      continue
    if ck_classes != (100 if args.dataset == "cifar100" else 10):
      raise SystemExit(f"error: --checkpoint {shown}: a {ck_classes}-class run; measure it on "
                       f"its own data set (--dataset {'cifar100' if ck_classes == 100 else 'cifar10'})")
    if not trained:
      name, width, num_classes = ck_name, ck_width, ck_classes
    elif (ck_name, ck_width, ck_classes) != (name, width, num_classes):
      notes.append(f"**Checkpoint {shown} skipped:** it holds {ck_name} width {ck_width:g}, "
                   f"not {name} width {width:g} like the first one.")
      log(f"(b) {notes[-1]}")
      continue
    trained.append((workdir, params, epoch, opt))
    notes.append(f"{shown}: {describe_run(workdir)}; analysed at its checkpoint of epoch "
                 f"{epoch}.")
    log(f"(b) checkpoint {workdir}: {ck_name} width {ck_width:g}, epoch {epoch}, {opt}")
  key = jax.random.key(args.seed + 1)
  results = [("init", measure_vgg(build_vgg(name, width, num_classes, args.seed), images, key,
                                  args.samples))]
  for workdir, params, epoch, opt in trained:
    model = build_vgg(name, width, num_classes, args.seed, params)
    results.append((f"{opt}, epoch {epoch} ({os.path.basename(os.path.normpath(workdir))})",
                    measure_vgg(model, images, key, args.samples)))
  title = f"{name.upper()}-BN, width {width:g}"
  stem = f"{name}_w{width:g}_scalars_vs_mean_eig"
  plot_vgg(results, os.path.join(out_dir, stem + ".png"), title)
  with open(os.path.join(out_dir, stem + ".json"), "w") as f:
    json.dump({label: rows for label, rows in results}, f, indent=1)
  note = "".join(n + "\n\n" for n in notes)
  return note + vgg_markdown(results, args, title) + f"\nPlot: `{stem}.png`.\n"

