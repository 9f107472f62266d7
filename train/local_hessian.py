"""Local-Hessian analysis of VGG-like blocks on real CIFAR images
(docs/method.md#5-local-hessians-measured; issue 5).

Two analyses, both on a batch of real CIFAR-10 images (the shipped sample by default):

(a) ``blocks``: spectra of the local Hessians ``H_W`` (kernel) and ``H_z`` (input) of 3×3
    conv blocks at initialization, under: with and without BatchNorm; Gaussian (He) and
    orthogonal initialization; with and without a skip connection (``z + block(z)``). The
    network is a 3→C stem followed by ``--depth`` C→C blocks of the same kind on 32×32 maps;
    every C→C block is measured: largest and smallest eigenvalue (Lanczos with full
    reorthogonalization), mean eigenvalue (Hutch++ for ``H_W``, Hutchinson for ``H_z``),
    condition number, the fraction of zero eigenvalues of ``H_z`` (an exact lower bound from
    counting inactive ReLUs, and a stochastic Lanczos quadrature estimate), and the scalar of
    docs/method.md#3-scalar-local-hessians next to the mean. Under BatchNorm the output is
    invariant (up to BatchNorm's ε) to rescaling each output channel's kernel, so ``H_W`` has
    ``n_out`` (numerically) zero eigenvalues; its smallest eigenvalue and condition number are
    reported on the orthogonal complement of those known directions (Lanczos on ``P H_W P``).
    Runs in float64.

(b) ``vgg``: for every block of a VGG-BN (``train.models``, ``--width`` multiplier), the
    scalars of docs/method.md#3-scalar-local-hessians ``m_{b,W}``, ``m_{b,z}`` (and ``m_{b,a}``
    for the BatchNorm offset / classifier bias) against the measured mean eigenvalues, at
    initialization and, with ``--checkpoint WORKDIR`` (a ``train/cifar.py`` work directory), at
    the last checkpoint: a markdown table and a PNG.

This module is the command line and the helpers both share; (a) is in
``train/local_hessian_blocks.py``, (b) in ``train/local_hessian_vgg.py``.

Usage::

  .venv/bin/python -m train.local_hessian --out train/results/local_hessian
  .venv/bin/python -m train.local_hessian --part vgg --checkpoint RUN1 --checkpoint RUN2 --out DIR

Everything random is derived from ``--seed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DN = ("NHWC", "HWIO", "NHWC")


def log(msg: str) -> None:
  print(f"[local_hessian {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _g(x, digits=3):
  return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_images(data_dir: str, batch_size: int, seed: int, dataset: str = "cifar10"):
  """A fixed random batch of normalized CIFAR training images (float32 NHWC) and its source."""
  from train import data as data_lib, pipeline
  ds = data_lib.load_cifar(dataset, data_dir)
  n = ds.train_images.shape[0]
  if batch_size > n:
    raise SystemExit(f"--batch-size {batch_size} exceeds the {n} images of {ds.source}")
  idx = np.sort(np.random.default_rng(seed).choice(n, batch_size, replace=False))
  images = pipeline.normalize(jnp.asarray(ds.train_images[idx]), dataset)
  return images, ds.source


def shown_path(path: str, placeholder: str) -> str:
  """A path as written into a committed report: repository-relative where it lies inside the
  repository or in ../shared, else ``placeholder`` (never an absolute path of this machine)."""
  from train import data as data_lib
  portable = data_lib.portable_path(path)
  return placeholder if os.path.isabs(portable) else portable


def checkpoint_names(args) -> dict:
  """``--checkpoint`` values -> how reports name them (``RUN1``, ... outside the repository)."""
  return {w: shown_path(w, f"RUN{i + 1}") for i, w in enumerate(args.checkpoint or [])}


def report_command(argv, args) -> str:
  """The command line for a report's header, with machine paths replaced (see shown_path)."""
  names = checkpoint_names(args)
  out, it = [], iter(argv)
  for a in it:
    flag, eq, value = a.partition("=")
    if flag in ("--checkpoint", "--data-dir", "--out"):
      value = value if eq else next(it, "")
      value = names.get(value) or (value if value == "sample" else shown_path(value, "DIR"))
      out += [flag, value]
    else:
      out.append(a)
  return "python -m train.local_hessian " + " ".join(out)


def describe_run(workdir: str) -> str:
  """A train/cifar.py work directory by what it holds (its config), not by its path."""
  try:
    from train import records
    c = records.load_config(workdir)
  except Exception as e:  # a report line, not a reason to fail
    return f"a train/cifar.py work directory (config unreadable: {type(e).__name__})"
  if c.data_dir is None:
    data = "tensorflow-datasets"
  elif c.data_dir == "sample":
    data = "the shipped sample"
  else:
    data = shown_path(c.data_dir, os.path.basename(os.path.normpath(c.data_dir)))
  reading = ""
  if c.optimizer == "scale_amended":  # which reading of the scalars trained it
    if getattr(c, "sa_input_scale", None):
      reading += f", input scale {c.sa_input_scale}"
    if getattr(c, "sa_gamma_aware", None):
      reading += ", γ²-aware"
  return (f"a train/cifar.py run of {c.model} width {c.width:g}, {c.optimizer} (lr "
          f"{c.lr if c.lr is not None else 'paper'}, {c.schedule}{reading}), {c.epochs} epochs, "
          f"seed {c.seed}, wd {c.weight_decay:g}, on {c.dataset} from {data}")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Local-Hessian spectra of VGG-like blocks and the "
                              "scalar local Hessians vs. measured mean eigenvalues "
                              "(docs/method.md#5-local-hessians-measured).")
  p.add_argument("--out", required=True, help="output directory (markdown, PNG, JSON)")
  p.add_argument("--part", choices=("all", "blocks", "vgg"), default="all")
  p.add_argument("--data-dir", default="sample",
                 help="CIFAR for train.data.load_cifar (default: the shipped CIFAR-10 sample)")
  p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10",
                 help="the images' data set; (b) with --checkpoint: the runs' (a CIFAR-100 "
                      "checkpoint is measured on CIFAR-100 images)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--samples", type=int, default=64,
                 help="Hutchinson samples (Hutch++ products for H_W in part a)")
  # (a)
  p.add_argument("--channels", type=int, default=16, help="(a) channels of the conv blocks")
  p.add_argument("--depth", type=int, default=2, help="(a) measured blocks after the stem")
  p.add_argument("--steps-w", type=int, default=120, help="(a) Lanczos steps on H_W")
  p.add_argument("--steps-z", type=int, default=80, help="(a) Lanczos steps on H_z")
  # (b)
  p.add_argument("--model", default="vgg16", help="(b) VGG at initialization")
  p.add_argument("--width", type=float, default=0.125, help="(b) channel multiplier")
  p.add_argument("--checkpoint", action="append", default=None, metavar="WORKDIR",
                 help="(b) a train/cifar.py work directory whose last checkpoint is analysed "
                      "too (repeatable; the first one's model and width replace "
                      "--model/--width)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  # The analyses import this module's helpers: imported here, not at the top.
  from train.local_hessian_blocks import part_blocks  # pylint: disable=import-outside-toplevel
  from train.local_hessian_vgg import part_vgg  # pylint: disable=import-outside-toplevel
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  images, source = load_images(args.data_dir, args.batch_size, args.seed, args.dataset)
  cmd = report_command(sys.argv[1:] if argv is None else argv, args)
  header = (f"Generated by `{cmd}` ({jax.devices()[0].platform}, jax {jax.__version__}). "
            f"Data: {source}.\n\n")
  if args.part in ("all", "blocks"):
    md = part_blocks(args, images, args.out)
    with open(os.path.join(args.out, "blocks.md"), "w") as f:
      f.write("# Local Hessians of VGG-like blocks\n\n" + header + md +
              "\nPlot: `blocks_hz_density.png` (cumulative SLQ spectral measure of H_z).\n")
    log(f"(a) written {os.path.join(args.out, 'blocks.md')}")
  if args.part in ("all", "vgg"):
    md = part_vgg(args, images, args.out)
    with open(os.path.join(args.out, "vgg.md"), "w") as f:
      f.write("# Scalar local Hessians vs. measured mean eigenvalues\n\n" + header + md)
    log(f"(b) written {os.path.join(args.out, 'vgg.md')}")
  log(f"done in {time.time() - t0:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
