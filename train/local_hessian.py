"""Local-Hessian analysis of VGG-like blocks on real CIFAR images (SPEC §5; issue 5).

Two analyses, both on a batch of real CIFAR-10 images (the shipped sample by default):

(a) ``blocks``: spectra of the local Hessians ``H_W`` (kernel) and ``H_z`` (input) of 3×3
    conv blocks at initialization, under: with and without BatchNorm; Gaussian (He) and
    orthogonal initialization; with and without a skip connection (``z + block(z)``). The
    network is a 3→C stem followed by ``--depth`` C→C blocks of the same kind on 32×32 maps;
    every C→C block is measured: largest and smallest eigenvalue (Lanczos with full
    reorthogonalization), mean eigenvalue (Hutch++ for ``H_W``, Hutchinson for ``H_z``),
    condition number, the fraction of zero eigenvalues of ``H_z`` (an exact lower bound from
    counting inactive ReLUs, and a stochastic Lanczos quadrature estimate), and the SPEC §3
    scalar next to the mean. Under BatchNorm the output is
    invariant (up to BatchNorm's ε) to rescaling each output channel's kernel, so ``H_W`` has
    ``n_out`` (numerically) zero eigenvalues; its smallest eigenvalue and condition number are
    reported on the orthogonal complement of those known directions (Lanczos on ``P H_W P``).
    Runs in float64.

(b) ``vgg``: for every block of a VGG-BN (``train.models``, ``--width`` multiplier), the SPEC §3
    scalars ``m_{b,W}``, ``m_{b,z}`` (and ``m_{b,a}`` for the BatchNorm offset / classifier bias)
    against the measured mean eigenvalues, at initialization and, with ``--checkpoint WORKDIR``
    (a ``train/cifar.py`` work directory), at the last checkpoint: a markdown table and a PNG.

Usage::

  .venv/bin/python -m train.local_hessian --out train/results/local_hessian
  .venv/bin/python -m train.local_hessian --part vgg --checkpoint RUN1 --checkpoint RUN2 --out DIR

Everything random is derived from ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import optax_bm  # noqa: E402
from optax_bm import backmatching  # noqa: E402
from optax_bm import hessian as hs  # noqa: E402
from optax_bm.specs import LayerSpec  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def log(msg: str) -> None:
  print(f"[local_hessian {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_images(data_dir: str, batch_size: int, seed: int):
  """A fixed random batch of normalized CIFAR-10 training images (float32 NHWC) and its source."""
  from train import data as data_lib, pipeline
  ds = data_lib.load_cifar("cifar10", data_dir)
  n = ds.train_images.shape[0]
  if batch_size > n:
    raise SystemExit(f"--batch-size {batch_size} exceeds the {n} images of {ds.source}")
  idx = np.sort(np.random.default_rng(seed).choice(n, batch_size, replace=False))
  images = pipeline.normalize(jnp.asarray(ds.train_images[idx]), "cifar10")
  return images, ds.source


# ----------------------------------------------------------------------------------------------
# (a) VGG-like blocks: BN / init / skip
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  bn: bool
  init: str  # "gaussian" | "orthogonal"
  skip: bool

  @property
  def label(self) -> str:
    return (f"{'BN' if self.bn else 'no BN'}, {self.init}, "
            f"{'skip' if self.skip else 'plain'}")


def conv_block(params, z, *, bn: bool, skip: bool, activation: bool = True):
  """3×3 SAME conv -> [BatchNorm (batch statistics) | bias] -> ReLU, plus z if skip.

  The convolution is written as supplement eq. 14 (``W_row a_i2c``): the same function as
  ``lax.conv_general_dilated``, but its transpose with respect to the kernel (half of every
  ``H_W`` product) is a matrix product, much faster on XLA:CPU than a transposed convolution.
  """
  y = hs.conv_im2col(params["kernel"], z, 1, "SAME")
  if bn:
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
    y = (y - mean) * jax.lax.rsqrt(var + 1e-5) * params["scale"] + params["offset"]
  else:
    y = y + params["bias"]
  if not activation:
    return y
  y = jax.nn.relu(y)
  return z + y if skip else y


def init_block(key, cin: int, cout: int, cfg: BlockConfig, dtype):
  """He-scaled kernels: Gaussian N(0, 2/fan_in), or orthogonal (3·3·cin, cout) × sqrt(2)."""
  shape = (3, 3, cin, cout)
  if cfg.init == "gaussian":
    kernel = jnp.sqrt(2.0 / (9 * cin)) * jax.random.normal(key, shape, dtype)
  elif cfg.init == "orthogonal":
    kernel = jax.nn.initializers.orthogonal(scale=math.sqrt(2.0))(key, shape, dtype)
    # orthonormal columns (unit-norm rows of W_row) times sqrt(2): ||w_k||^2 = 2, as He's mean
  else:
    raise ValueError(cfg.init)
  p = {"kernel": kernel}
  if cfg.bn:
    p["scale"] = jnp.ones((cout,), dtype)
    p["offset"] = jnp.zeros((cout,), dtype)
  else:
    p["bias"] = jnp.zeros((cout,), dtype)
  return p


def kernel_null_basis(kernel):
  """Under BatchNorm, F(W) = F(W with output channel k scaled) up to BatchNorm's ε: W's
  channel-k slice, one unit vector per output channel (disjoint supports, so orthonormal),
  flattened like the kernel."""
  n_out = kernel.shape[-1]
  eye = jnp.eye(n_out, dtype=kernel.dtype)
  vecs = (kernel[..., None] * eye).reshape(-1, n_out).T  # (n_out, size)
  return vecs / jnp.linalg.norm(vecs, axis=1, keepdims=True)


def measure_block(params, z, cfg: BlockConfig, key, *, steps_w: int, steps_z: int,
                  samples: int):
  """Spectral statistics of one block's H_W (kernel) and H_z, jitted as one program."""

  def block_fn(p, x):
    return conv_block(p, x, bn=cfg.bn, skip=cfg.skip)

  @jax.jit
  def run(params, z, key):
    kernel = params["kernel"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    op_w = hs.gauss_newton_operator(lambda w, x: conv_block({**params, "kernel": w}, x,
                                                            bn=cfg.bn, skip=cfg.skip),
                                    kernel, z, "params")
    if cfg.bn:
      basis = kernel_null_basis(kernel)
      project = lambda v: v - basis.T @ (basis @ v)
      matvec_c = lambda v: project(op_w.matvec(project(v)))
      start = project(jax.random.rademacher(k1, (op_w.dim,), kernel.dtype))
      null_dim = basis.shape[0]
      # the known null directions really are null: ||H u|| for them, relative to λ_max later
      null_res = jnp.max(jnp.linalg.norm(jax.lax.map(op_w.matvec, basis), axis=1))
    else:
      matvec_c, start, null_dim, null_res = op_w.matvec, None, 0, jnp.zeros((), kernel.dtype)
    lw = hs.lanczos(matvec_c, op_w.dim, steps_w, k1, start=start)
    mw = hs.mean_eigenvalue(op_w.matvec, op_w.dim, samples, k2, method="hutch++")
    op_z = hs.gauss_newton_operator(block_fn, params, z, "input")
    lz = hs.lanczos(op_z.matvec, op_z.dim, steps_z, k3)
    mz = hs.mean_eigenvalue(op_z.matvec, op_z.dim, samples, k4)
    # Rows of J_z that are not identically zero: outputs whose ReLU is active (every output
    # row for a skip block, whose identity path keeps J_z's rows alive).
    pre = conv_block(params, z, bn=cfg.bn, skip=False, activation=False)
    active = jnp.sum(pre > 0)
    return dict(w_ritz=lw.ritz_values, w_mean=mw.value, w_se=mw.stderr, w_null_dim=null_dim,
                w_null_res=null_res, z_ritz=lz.ritz_values, z_weights=lz.weights,
                z_mean=mz.value, z_se=mz.stderr, z_sq=jnp.mean(jnp.square(z)), active=active)

  out = jax.device_get(run(params, z, key))
  spec = LayerSpec(0, "kernel", "conv", s=int(z.shape[1] * z.shape[2]), c=1.0,
                   normalized=cfg.bn)
  sc = optax_bm.local_hessian_scalars(spec, params["kernel"])
  out["m_w"], out["m_z"] = float(sc.m_w), float(sc.m_z)
  out["dim_w"], out["dim_z"] = int(params["kernel"].size), int(z.size)
  return out


def part_blocks(args, images, out_dir: str) -> str:
  """Analysis (a): returns the markdown."""
  configs = [BlockConfig(bn, init, skip) for bn in (True, False)
             for init in ("gaussian", "orthogonal") for skip in (False, True)]
  rows = []
  with jax.enable_x64(True):
    x = jnp.asarray(images, jnp.float64)
    for cfg in configs:
      # The same draws for every config (paired comparison): with the same init, BN on/off and
      # skip on/off see identical kernels; the first measured block of a skip and a plain
      # network even has the same H_W (the identity path does not depend on W).
      k_stem, k_blocks, k_meas = jax.random.split(jax.random.key(args.seed), 3)
      stem_cfg = dataclasses.replace(cfg, skip=False)  # channels change: no skip on the stem
      stem = init_block(k_stem, 3, args.channels, stem_cfg, jnp.float64)
      z = jax.jit(lambda p, x: conv_block(p, x, bn=cfg.bn, skip=False))(stem, x)
      for d in range(args.depth):
        params = init_block(jax.random.fold_in(k_blocks, d), args.channels, args.channels, cfg,
                            jnp.float64)
        t0 = time.time()
        r = measure_block(params, z, cfg, jax.random.fold_in(k_meas, d), steps_w=args.steps_w,
                          steps_z=args.steps_z, samples=args.samples)
        r.update(config=cfg, block=d + 1)
        rows.append(r)
        log(f"(a) {cfg.label} block {d + 1}: λmax(H_W)={r['w_ritz'][-1]:.4g} "
            f"mean(H_W)={r['w_mean']:.4g} m_W={r['m_w']:.4g} | λmax(H_z)={r['z_ritz'][-1]:.4g} "
            f"mean(H_z)={r['z_mean']:.4g} m_z={r['m_z']:.4g} ({time.time() - t0:.0f}s)")
        z = jax.jit(lambda p, x: conv_block(p, x, bn=cfg.bn, skip=cfg.skip))(params, z)
  md = blocks_markdown(rows, args)
  with open(os.path.join(out_dir, "blocks.json"), "w") as f:
    json.dump([_jsonable(r) for r in rows], f, indent=1)
  plot_blocks(rows, os.path.join(out_dir, "blocks_hz_density.png"))
  return md


def _jsonable(r):
  out = {}
  for k, v in r.items():
    if isinstance(v, BlockConfig):
      out[k] = dataclasses.asdict(v)
    elif isinstance(v, (np.ndarray, jax.Array)):
      out[k] = np.asarray(v).tolist()
    elif isinstance(v, (np.floating, np.integer)):
      out[k] = v.item()
    else:
      out[k] = v
  return out


def _g(x, digits=3):
  return f"{x:.{digits}g}"


SMALL_REL = 1e-3  # SLQ mass reported below SMALL_REL * λ_max


def blocks_markdown(rows, args) -> str:
  lines = [
      "## (a) Local-Hessian spectra of VGG-like conv blocks at initialization", "",
      f"Real CIFAR-10 images (batch {args.batch_size}), a 3→{args.channels} stem, then "
      f"{args.depth} blocks {args.channels}→{args.channels} (3×3 conv, SAME, 32×32, "
      "[BatchNorm with batch statistics | bias], ReLU, [+ z]); float64. Gaussian = N(0, 2/fan_in); "
      "orthogonal = orthonormal columns of the (3·3·C_in, C_out) kernel × √2 (same ‖w_k‖² = 2). "
      "BN scale 1, offset 0, bias 0. All configs use the same random draws (paired), so block 1 "
      "of a 'skip' and a 'plain' network has the same H_W.", "",
      f"λ_max, λ_min: extreme Ritz values of Lanczos with full reorthogonalization "
      f"({args.steps_w} steps on H_W, {args.steps_z} on H_z): λ_max is a lower bound, the "
      "smallest Ritz value an upper bound on λ_min, so κ = λ_max/λ_min from them is a lower "
      "bound ('≥'). mean = tr/dim (H_W: Hutch++ with "
      f"{args.samples} products; H_z: Hutchinson with {args.samples} Rademacher vectors; "
      "± one standard error).", "",
      "H_W: with BN, the C_out null directions (each output channel's kernel slice: BN's "
      "output does not change when it is scaled, up to BN's ε) are projected out before Lanczos, "
      "so λ_min⁺ and "
      "κ⁺ are on their orthogonal complement; 'null res.' = max ‖H_W u‖/λ_max over those "
      "directions (≈ 0 confirms they are null).", "",
      "H_z: 'zero eig. ≥' is exact, by counting: J_z has a zero row for every output whose ReLU "
      "is off, so at least 1 − (active outputs)/dim(z) of H_z's eigenvalues are 0 (then κ = ∞); "
      "a skip connection keeps every row alive ('–'). 'SLQ mass' = the fraction of eigenvalues "
      f"≤ {SMALL_REL:g}·λ_max estimated by Lanczos quadrature from one Rademacher probe "
      "(resolution limited by the number of steps).", "",
      "The SPEC §3 scalars use s = 1024, c = 1; the SPEC's blocks have no skip connection, so "
      "for skip blocks the scalar is shown for reference only.", "",
      "### H_W (kernel)", "",
      "| config | block | λ_max | λ_min⁺ | κ⁺ | null res. | mean ± s.e. | λ_max/mean | m_W (SPEC) "
      "| mean/m_W |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cfg = r["config"]
    lmax, lmin = float(r["w_ritz"][-1]), float(r["w_ritz"][0])
    null = f"{float(r['w_null_res']) / lmax:.1e}" if cfg.bn else "–"
    lines.append(
        f"| {cfg.label} | {r['block']} | {_g(lmax)} | {_g(lmin)} | ≥ {_g(lmax / lmin)} | "
        f"{null} | {_g(r['w_mean'])} ± {_g(r['w_se'], 2)} | {_g(lmax / r['w_mean'])} | "
        f"{_g(r['m_w'])} | {r['w_mean'] / r['m_w']:.3f} |")
  lines += ["", "### H_z (block input, whole batch)", "",
            "| config | block | E[z²] | λ_max | λ_min | zero eig. ≥ | SLQ mass | κ | "
            "mean ± s.e. | λ_max/mean | m_z (SPEC) | mean/m_z |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cfg = r["config"]
    ritz = np.asarray(r["z_ritz"])
    lmax, lmin = float(ritz[-1]), float(ritz[0])
    small = float(np.sum(np.where(ritz <= SMALL_REL * lmax, r["z_weights"], 0.0)))
    if cfg.skip:
      nullity, kappa = "–", f"≥ {_g(lmax / lmin)}"
    else:
      frac = max(0.0, 1.0 - float(r["active"]) / r["dim_z"])
      nullity = f"{frac:.2f}"
      kappa = "∞" if frac > 0 else f"≥ {_g(lmax / lmin)}"
    ratio = f"{r['z_mean'] / r['m_z']:.3f}" + (" (skip)" if cfg.skip else "")
    lines.append(
        f"| {cfg.label} | {r['block']} | {_g(float(r['z_sq']))} | {_g(lmax)} | {_g(lmin)} | "
        f"{nullity} | {small:.2f} | {kappa} | {_g(r['z_mean'])} ± {_g(r['z_se'], 2)} | "
        f"{_g(lmax / r['z_mean'])} | {_g(r['m_z'])} | {ratio} |")
  return "\n".join(lines) + "\n"


def plot_blocks(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  last = max(r["block"] for r in rows)
  sel = [r for r in rows if r["block"] == last]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, bn in zip(axes, (True, False)):
    for r in sel:
      cfg = r["config"]
      if cfg.bn != bn:
        continue
      nodes = np.asarray(r["z_ritz"]) / r["z_mean"]
      w = np.asarray(r["z_weights"])
      order = np.argsort(nodes)
      ax.step(nodes[order], np.cumsum(w[order]), where="post",
              label=f"{cfg.init}, {'skip' if cfg.skip else 'plain'}")
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.set_xlabel("eigenvalue / mean eigenvalue")
    ax.set_ylabel("cumulative spectral mass (SLQ, 1 probe)")
    ax.set_title(f"H_z of block {last}, {'with' if bn else 'without'} BatchNorm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# (b) VGG-BN: SPEC scalars against the measured mean eigenvalue, per block
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
      f"## (b) {title}: SPEC §3 scalars vs. measured mean eigenvalue, per block", "",
      f"Batch of {args.batch_size} real CIFAR-10 images, BatchNorm on batch statistics, float32. "
      f"Measured: tr(H)/dim by Hutchinson ({args.samples} Rademacher vectors, ± one standard "
      "error); H_W is the kernel's block of H_θ = J_θᵀJ_θ/N, H_z = J_zᵀJ_z over the whole batch; "
      "the offset column is the exact mean eigenvalue of the BatchNorm offset's block (the "
      "classifier's bias for the last block) against m_a = s. E[z²]: second moment of the "
      "block's input; E[γ²]: mean squared BatchNorm scale, which the SPEC's scalars ignore "
      "(H_W, H_z and the offset's block all scale with γ²). The top block (classifier) is "
      "measured with identity loss curvature, as the SPEC takes it. ratio = measured / scalar "
      "(1 = the scalar is the mean eigenvalue).", ""]
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
    ax.set_title(f"{name}: measured tr/dim (solid) vs SPEC scalar (dashed)", fontsize=10)
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
  return (f"a train/cifar.py run of {c.model} width {c.width:g}, {c.optimizer} (lr "
          f"{c.lr if c.lr is not None else 'paper'}, {c.schedule}), {c.epochs} epochs, seed "
          f"{c.seed}, on {c.dataset} from {data}")


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


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Local-Hessian spectra of VGG-like blocks and SPEC §3 "
                              "scalars vs. measured mean eigenvalues (SPEC §5).")
  p.add_argument("--out", required=True, help="output directory (markdown, PNG, JSON)")
  p.add_argument("--part", choices=("all", "blocks", "vgg"), default="all")
  p.add_argument("--data-dir", default="sample",
                 help="CIFAR-10 for train.data.load_cifar (default: the shipped sample)")
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
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  images, source = load_images(args.data_dir, args.batch_size, args.seed)
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
      f.write("# SPEC scalars vs. measured local-Hessian mean eigenvalues\n\n" + header + md)
    log(f"(b) written {os.path.join(args.out, 'vgg.md')}")
  log(f"done in {time.time() - t0:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
