"""Local-Hessian analysis (a) of ``train/local_hessian.py``: spectra of the local Hessians of
VGG-like conv blocks at initialization, with and without BatchNorm, Gaussian or orthogonal
initialization, with and without a skip connection (see that module's docstring)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_bm
from optax_bm import hessian as hs
from optax_bm.specs import LayerSpec
from train.local_hessian import _g, log

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
      "The scalars of `docs/method.md#3-scalar-local-hessians` use s = 1024, c = 1; its blocks have no skip connection, so "
      "for skip blocks the scalar is shown for reference only.", "",
      "### H_W (kernel)", "",
      "| config | block | λ_max | λ_min⁺ | κ⁺ | null res. | mean ± s.e. | λ_max/mean | m_W (scalar) "
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
            "mean ± s.e. | λ_max/mean | m_z (scalar) | mean/m_z |",
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

