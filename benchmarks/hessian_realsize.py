"""Matrix-free local Hessian of a real-size conv block: time and peak memory (not run in CI).

The block is VGG's 64-channel stage at full width: 3×3 conv 64→64 (SAME, no bias) ->
BatchNorm (batch statistics) -> ReLU on a batch of 32×32×64 inputs, so ``H_z`` has dimension
65,536 per example and, because BatchNorm couples the examples, ``N · 65,536`` over the batch
(a dense ``H_z`` would need ``(N · 65,536)² · 4`` bytes). The inputs are real CIFAR-10 images
(the shipped sample) through a 3→64 conv-BN-ReLU stem, so the activations look like a VGG's.

Measured, in float32, everything jitted: Lanczos with full reorthogonalization on ``H_z``
(extreme eigenvalues), Hutchinson on ``H_z`` (mean eigenvalue), Lanczos and Hutch++ on the
kernel block ``H_W`` (dimension 36,864); wall times (compile separately) and the process's peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The convolution is written
in the im2col form of supplement eq. 14 (a matrix product), and, for comparison, as
``lax.conv_general_dilated``: XLA:CPU's transposed convolution with respect to the kernel (the
``J_W^T`` half of an ``H_W`` product) is far slower than the im2col matrix product.

Run::

  .venv/bin/python benchmarks/hessian_realsize.py --batch-size 8 --out train/results/local_hessian
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optax_bm import hessian as hs  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def lax_conv(kernel, z):
  return jax.lax.conv_general_dilated(z, kernel, (1, 1), "SAME", dimension_numbers=DN)


def im2col_conv(kernel, z):
  return hs.conv_im2col(kernel, z, 1, "SAME")  # supplement eq. 14: W_row @ a_i2c


def conv_bn_relu(params, z, conv=im2col_conv):
  y = conv(params["kernel"], z)
  mean = jnp.mean(y, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
  y = (y - mean) * jax.lax.rsqrt(var + 1e-5) * params["scale"] + params["offset"]
  return jax.nn.relu(y)


def init(key, cin, cout):
  std = np.sqrt(2.0 / (9 * cin))
  return {"kernel": std * jax.random.normal(key, (3, 3, cin, cout), jnp.float32),
          "scale": jnp.ones((cout,), jnp.float32), "offset": jnp.zeros((cout,), jnp.float32)}


def images(batch_size, data_dir):
  try:
    from train import data as data_lib, pipeline
    ds = data_lib.load_cifar("cifar10", data_dir)
    return pipeline.normalize(jnp.asarray(ds.train_images[:batch_size])), ds.source
  except ImportError as e:  # pragma: no cover
    raise SystemExit(f"train.data is needed for the CIFAR images: {e}")


def timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--channels", type=int, default=64)
  p.add_argument("--lanczos-steps", type=int, default=50)
  p.add_argument("--hutchinson-samples", type=int, default=32)
  p.add_argument("--lax-kernel-samples", type=int, default=6,
                 help="Hutchinson vectors for H_W with lax convs (slow on XLA:CPU)")
  p.add_argument("--data-dir", default="sample")
  p.add_argument("--out", default=None, help="directory for realsize.md / realsize.json")
  args = p.parse_args(argv)

  rss0 = peak_rss_mib()
  x, source = images(args.batch_size, args.data_dir)
  k_stem, k_block, k_run = jax.random.split(jax.random.key(0), 3)
  c = args.channels
  z = jax.jit(conv_bn_relu)(init(k_stem, 3, c), x)
  params = init(k_block, c, c)
  dim_z = int(z.size)
  dim_w = int(params["kernel"].size)
  steps = args.lanczos_steps
  samples = args.hutchinson_samples

  def block(conv):
    return lambda p, x: conv_bn_relu(p, x, conv)

  def kernel_block(conv):
    return lambda w, x: conv_bn_relu({**params, "kernel": w}, x, conv)

  def lanczos_z(conv):
    @jax.jit
    def f(params, z, key):
      op = hs.gauss_newton_operator(block(conv), params, z, "input")
      return hs.lanczos(op.matvec, op.dim, steps, key).ritz_values
    return f

  def hutchinson_z(conv):
    @jax.jit
    def f(params, z, key):
      op = hs.gauss_newton_operator(block(conv), params, z, "input")
      return hs.mean_eigenvalue(op.matvec, op.dim, samples, key)
    return f

  def kernel_stats(conv):
    @jax.jit
    def f(w, z, key):
      op = hs.gauss_newton_operator(kernel_block(conv), w, z, "params")
      k1, k2 = jax.random.split(key)
      return (hs.lanczos(op.matvec, op.dim, steps, k1).ritz_values,
              hs.mean_eigenvalue(op.matvec, op.dim, 3 * samples, k2, method="hutch++"))
    return f

  def kernel_hutchinson(conv, n):
    @jax.jit
    def f(w, z, key):
      op = hs.gauss_newton_operator(kernel_block(conv), w, z, "params")
      return hs.mean_eigenvalue(op.matvec, op.dim, n, key)
    return f

  lax_w_samples = args.lax_kernel_samples
  plan = [("H_z Lanczos", "im2col", steps, lanczos_z(im2col_conv), (params, z, k_run)),
          ("H_z Hutchinson", "im2col", samples, hutchinson_z(im2col_conv), (params, z, k_run)),
          ("H_W Lanczos + Hutch++", "im2col", steps + 3 * samples, kernel_stats(im2col_conv),
           (params["kernel"], z, k_run)),
          ("H_z Lanczos", "lax", steps, lanczos_z(lax_conv), (params, z, k_run)),
          ("H_W Hutchinson", "lax", lax_w_samples, kernel_hutchinson(lax_conv, lax_w_samples),
           (params["kernel"], z, k_run)),
          ("H_W Hutchinson", "im2col", lax_w_samples,
           kernel_hutchinson(im2col_conv, lax_w_samples), (params["kernel"], z, k_run))]
  rows = {}
  for name, impl, nmv, fn, a in plan:
    t0 = time.perf_counter()
    compiled = fn.lower(*a).compile()
    t_compile = time.perf_counter() - t0
    out, t_run = timed(compiled, *a)
    rows[(name, impl)] = (t_compile, t_run, out, nmv)
    print(f"{name} [{impl} conv]: {nmv} matvecs, compile {t_compile:.1f}s, run {t_run:.1f}s "
          f"({t_run / nmv:.3f} s/matvec), peak RSS {peak_rss_mib():.0f} MiB", flush=True)

  ritz_z = np.asarray(rows[("H_z Lanczos", "im2col")][2])
  ritz_z_lax = np.asarray(rows[("H_z Lanczos", "lax")][2])
  mean_z = rows[("H_z Hutchinson", "im2col")][2]
  ritz_w, mean_w = rows[("H_W Lanczos + Hutch++", "im2col")][2]
  ritz_w = np.asarray(ritz_w)
  w_lax, w_i2c = rows[("H_W Hutchinson", "lax")][2], rows[("H_W Hutchinson", "im2col")][2]
  result = {
      "device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPU cores, "
                f"{platform.machine()})",
      "jax": jax.__version__, "batch_size": args.batch_size, "channels": c,
      "dim_z": dim_z, "dim_z_per_example": dim_z // args.batch_size, "dim_w": dim_w,
      "dense_H_z_bytes_f32": 4 * dim_z ** 2, "lanczos_steps": steps,
      "hutchinson_samples": samples, "hutchpp_matvecs": 3 * samples,
      "lambda_max_z": float(ritz_z[-1]), "ritz_min_z": float(ritz_z[0]),
      "mean_eig_z": float(mean_z.value), "mean_eig_z_stderr": float(mean_z.stderr),
      "lambda_max_w": float(ritz_w[-1]), "ritz_min_w": float(ritz_w[0]),
      "mean_eig_w": float(mean_w.value), "mean_eig_w_stderr": float(mean_w.stderr),
      "lambda_max_z_lax_conv": float(ritz_z_lax[-1]),
      "mean_eig_w_same_keys_lax_vs_im2col": [float(w_lax.value), float(w_i2c.value)],
      "timings_s": {f"{k[0]} [{k[1]} conv]": {"matvecs": v[3], "compile": round(v[0], 2),
                                              "run": round(v[1], 2)}
                    for k, v in rows.items()},
      "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_mib": round(rss0, 1),
      "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
      "data": source,
  }
  print(json.dumps(result, indent=2))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "realsize.json"), "w") as f:
      json.dump(result, f, indent=2)
    lines = [
        "# Real-size matrix-free local Hessian (64-channel 3×3 conv + BN + ReLU, 32×32)", "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/hessian_realsize.py'] + (argv or sys.argv[1:]))}`",
        "", f"Device: {result['device']}, jax {jax.__version__}, float32. Data: {source}.",
        f"Load average at the end (1/5/15 min): {result['load_average_1_5_15min_at_end']} — "
        "other jobs shared the 2 cores, so the times are upper bounds.", "",
        f"- H_z: dimension {dim_z:,} ({dim_z // args.batch_size:,} per example × batch "
        f"{args.batch_size}); a dense H_z would take {4 * dim_z ** 2 / 2 ** 30:,.0f} GiB.",
        f"- H_W (kernel): dimension {dim_w:,}.", "",
        "Every computation is one jitted program; 'im2col' writes the convolution as supplement "
        "eq. 14 (`optax_bm.hessian.conv_im2col`, a matrix product), 'lax' as "
        "`lax.conv_general_dilated` (what `nnx.Conv` runs). Same keys, same numbers: "
        f"λ_max(H_z) {ritz_z[-1]:.6g} (im2col) vs {ritz_z_lax[-1]:.6g} (lax); mean(H_W) from "
        f"{lax_w_samples} Hutchinson vectors {float(w_i2c.value):.6g} (im2col) vs "
        f"{float(w_lax.value):.6g} (lax).", "",
        "| computation | conv | matvecs | compile (s) | run (s) | s / matvec |",
        "|---|---|---|---|---|---|"]
    for k, v in rows.items():
      lines.append(f"| {k[0]} | {k[1]} | {v[3]} | {v[0]:.1f} | {v[1]:.1f} | {v[1] / v[3]:.3f} |")
    lines += [
        "", f"Peak resident memory of the whole process: **{result['peak_rss_mib']:.0f} MiB** "
        f"(after loading data and JAX: {rss0:.0f} MiB at start).", "",
        "| | λ_max (Lanczos) | smallest Ritz value | mean eigenvalue (± s.e.) |",
        "|---|---|---|---|",
        f"| H_z | {result['lambda_max_z']:.4g} | {result['ritz_min_z']:.3g} | "
        f"{result['mean_eig_z']:.4g} ± {result['mean_eig_z_stderr']:.2g} |",
        f"| H_W | {result['lambda_max_w']:.4g} | {result['ritz_min_w']:.3g} | "
        f"{result['mean_eig_w']:.4g} ± {result['mean_eig_w_stderr']:.2g} |", ""]
    with open(os.path.join(args.out, "realsize.md"), "w") as f:
      f.write("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
