"""BatchNorm + ReLU with a hand-written derivative against Flax's, in the trainer's step.

Issue 21's profile (``results/peer_profile.md``) put 13.0 ms of VGG11's width-1/8 step in
BatchNorm, ReLU and layout copies against PyTorch's 7.0 ms. XLA:CPU differentiates
``nnx.BatchNorm`` + ``nnx.relu`` by autodiff and recomputes the normalized activations in the
backward pass; PyTorch calls one fused BatchNorm backward kernel. This script tests whether a
hand-written derivative closes that part of the gap: :func:`bn_relu` is training-mode
BatchNorm followed by ReLU under ``jax.custom_vjp``, whose backward pass is the textbook one
(two per-channel sums, then one elementwise pass)::

  g = dy · [y > 0],   x̂ = (x − μ) / σ,
  dβ = Σ g,   dγ = Σ g x̂,   dx = (γ / σ) (g − dβ / n − x̂ dγ / n).

It replaces ``train.models.ConvBlock``'s BatchNorm and ReLU (training mode only; the running
statistics are updated as Flax does) while the trainer's step is traced, checks that a few
SGD steps give the same parameters as Flax's, then times both steps interleaved in one
process (the median per-step time and the median of the per-repetition ratios). The trainer
does not use it: measured, it changes the step by a few percent at most (see
``benchmarks/README.md``).

Usage::

  python benchmarks/batchnorm_vjp.py                       # VGG11, VGG13 at width 1/8
  python benchmarks/batchnorm_vjp.py --models vgg11 --widths 1/8,1 --repeats 9
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# pylint: disable=wrong-import-position
from train import cli  # noqa: E402  (sets nothing on import; the flags are set in main)
# pylint: enable=wrong-import-position

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "batchnorm_vjp.md"


def _batch_statistics(x, epsilon: float):
  """``(mean, var, 1/sqrt(var + ε))`` over all axes but the last, as Flax computes them (its
  fast variance, E[x²] − E[x]², clipped at 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  return mean, var, jax.lax.rsqrt(var + epsilon)


def bn_relu_fn(epsilon: float):
  """``bn_relu(x, scale, bias) -> (relu(BN(x)), batch mean, batch variance)`` over all axes but
  the last, with the hand-written VJP above (the statistics get no cotangent: the trainer
  only stores them, as running averages, outside the gradient)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def forward(x, scale, bias):
    mean, var, inv = _batch_statistics(x, epsilon)
    y = jax.nn.relu((x - mean) * (inv * scale) + bias)  # Flax's order of operations
    return y, mean, var, inv

  @jax.custom_vjp
  def bn_relu(x, scale, bias):
    y, mean, var, _ = forward(x, scale, bias)
    return y, mean, var

  def fwd(x, scale, bias):
    y, mean, var, inv = forward(x, scale, bias)
    return (y, mean, var), (x, y, mean, inv, scale)

  def bwd(res, cts):
    x, y, mean, inv, scale = res
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    g = jnp.where(y > 0, cts[0], 0.0)
    xhat = (x - mean) * inv
    dbias = jnp.sum(g, axes)
    dscale = jnp.sum(g * xhat, axes)
    dx = (scale * inv) * (g - dbias / n - xhat * (dscale / n))
    return dx, dscale, dbias

  bn_relu.defvjp(fwd, bwd)
  return bn_relu


def bn_relu_jvp_fn(epsilon: float):
  """:func:`bn_relu_fn`'s function with a hand-written JVP instead (``jax.custom_jvp``):
  forward mode keeps working (a ``custom_vjp`` function has no JVP, and the local-Hessian
  tools push tangents through the models), and reverse mode is JAX's transpose of it."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def forward(x, scale, bias):
    mean, var, inv = _batch_statistics(x, epsilon)
    xhat = (x - mean) * inv
    return jax.nn.relu(xhat * scale + bias), mean, var, inv, xhat

  @jax.custom_jvp
  def bn_relu(x, scale, bias):
    return forward(x, scale, bias)[:3]

  @bn_relu.defjvp
  def jvp(primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    axes = tuple(range(x.ndim - 1))
    y, mean, var, inv, xhat = forward(x, scale, bias)
    dmean = jnp.mean(dx, axes)
    dcentered = dx - dmean
    dvar = 2.0 * jnp.mean((x - mean) * dcentered, axes)
    dxhat = inv * (dcentered - xhat * jnp.mean(xhat * dcentered, axes))
    dy = jnp.where(y > 0, dxhat * scale + xhat * dscale + dbias, 0.0)
    return (y, mean, var), (dy, dmean, dvar)

  return bn_relu


@contextlib.contextmanager
def hand_written_batchnorm(rule: str = "vjp"):
  """Within: ``train.models.ConvBlock`` runs BatchNorm + ReLU through :func:`bn_relu_fn`
  (``rule="vjp"``) or :func:`bn_relu_jvp_fn` (``"jvp"``) in training mode (evaluation mode is
  unchanged). Only tracing needs to happen inside."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from train import models  # pylint: disable=import-outside-toplevel

  def call(self, x):
    x = self.conv(x)
    bn = self.bn
    if bn.use_running_average:
      x = nnx.relu(bn(x))
    else:
      fn = bn_relu_fn if rule == "vjp" else bn_relu_jvp_fn
      x, mean, var = fn(bn.epsilon)(x, bn.scale[...], bn.bias[...])
      m = bn.momentum
      bn.mean[...] = jax.lax.stop_gradient(m * bn.mean[...] + (1 - m) * mean)
      bn.var[...] = jax.lax.stop_gradient(m * bn.var[...] + (1 - m) * var)
    if self.pool:
      x = models.max_pool_2x2(x)
    if self.flatten:
      x = x.reshape(x.shape[0], -1)
    return x

  original = models.ConvBlock.__call__
  models.ConvBlock.__call__ = call
  try:
    yield
  finally:
    models.ConvBlock.__call__ = original


# The variants timed: Flax's BatchNorm + ReLU, and the two hand-written derivatives.
RULES = {"flax": None, "custom_vjp": "vjp", "custom_jvp": "jvp"}


def compiled_step(name: str, width: float, batch: int, rule):
  """The trainer's SGD step (``train.steps.train_step``), compiled with Flax's BatchNorm
  (``rule=None``) or a hand-written one (``"vjp"``, ``"jvp"``); ``(fn, state, images, labels)``
  with ``fn(state, images, labels) -> (state, metrics)`` donating the state."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  from benchmarks import peer_pytorch as pp  # pylint: disable=import-outside-toplevel
  step, state, _ = pp.trainer_step(name, width, "sgd", batch)
  images, labels = oo.fake_batch(batch=batch)
  with hand_written_batchnorm(rule) if rule else contextlib.nullcontext():
    fn = jax.jit(step, donate_argnums=(0,)).lower(state, images, labels).compile()
  return fn, state, images, labels


def agreement(name: str, width: float, batch: int, steps: int) -> dict:
  """Runs ``steps`` SGD steps each way from the same state; per hand-written variant, the
  largest parameter or BatchNorm-statistic difference from Flax's, relative to the leaf's
  largest magnitude; and every variant's loss."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  out = {}
  for label, rule in RULES.items():
    fn, state, images, labels = compiled_step(name, width, batch, rule)
    for _ in range(steps):
      state, metrics = fn(state, images, labels)
    out[label] = (jax.device_get({k: state[k] for k in ("params", "batch_stats")}),
                  float(metrics["loss"]) / float(metrics["count"]))
  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
  return {"max_rel_diff": {k: max(jax.tree.leaves(jax.tree.map(rel, out["flax"][0], v[0])))
                           for k, v in out.items() if k != "flax"},
          "loss": {k: v[1] for k, v in out.items()}}


def timing(name: str, width: float, batch: int, repeats: int, sample_seconds: float) -> dict:
  """Median ms per step of every variant, and each hand-written one's median per-repetition
  ratio to Flax's."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  chains = {}
  for label, rule in RULES.items():
    fn, state, images, labels = compiled_step(name, width, batch, rule)
    chains[label] = oo.Chain(fn, (state,), (images, labels), 1)
  for c in chains.values():
    c.calibrate(sample_seconds, max_k=50)
  times = oo.interleaved(chains, repeats)
  base = np.asarray(times["flax"])
  return {"ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
          "ratio": {k: float(np.median(np.asarray(v) / base)) for k, v in times.items()
                    if k != "flax"}}


def parse_args(argv=None) -> argparse.Namespace:
  from benchmarks import peer_pytorch as pp  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vgg11,vgg13", help="comma-separated VGG names")
  p.add_argument("--widths", default="1/8", help="comma-separated widths, e.g. 1/8,1")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--sample-seconds", type=float, default=0.5)
  p.add_argument("--check-steps", type=int, default=1,
                 help="SGD steps compared both ways before timing")
  p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report ('' for none)")
  args = p.parse_args(argv)
  args.model_list = [m for m in args.models.split(",") if m]
  bad = [m for m in args.model_list if not m.startswith("vgg")]
  if bad or not args.model_list:
    p.error(f"--models {args.models!r}: VGG names only (vgg11, vgg13, vgg16, vgg19); the "
            "residual models' blocks are not patched")
  try:
    args.width_list = [pp.parse_width(w) for w in args.widths.split(",") if w]
  except pp.UsageError as e:
    p.error(str(e))
  if min(args.batch, args.repeats, args.check_steps) < 1:
    p.error("--batch, --repeats and --check-steps must be at least 1")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.set_cpu_xla_flags()
  from benchmarks import peer_pytorch as pp  # pylint: disable=import-outside-toplevel
  from train import atomic  # pylint: disable=import-outside-toplevel
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  load0 = oo.load_line("at start")
  rows = []
  for name in args.model_list:
    for width in args.width_list:
      agree = agreement(name, width, args.batch, args.check_steps)
      t = timing(name, width, args.batch, args.repeats, args.sample_seconds)
      rows.append((name, width, agree, t))
      print(f"{name} w{pp.width_label(width)}: " + ", ".join(
          f"{k} {t['ms'][k]:.1f} ms" for k in RULES) + "; ratios " + ", ".join(
              f"{k} {t['ratio'][k]:.3f}" for k in t["ratio"]) + "; max rel. differences " +
            ", ".join(f"{k} {v:.1e}" for k, v in agree["max_rel_diff"].items()), flush=True)
  load1 = oo.load_line("at the end")
  cmd = " ".join(["python", "benchmarks/batchnorm_vjp.py", *(argv if argv is not None
                                                            else sys.argv[1:])])
  lines = [
      "# BatchNorm + ReLU with a hand-written derivative, in the trainer's step (issue 21)", "",
      f"Command: `{cmd}`", "",
      oo.machine_line(), "", f"{load0}; {load1}.", "",
      f"The trainer's SGD step, batch {args.batch}, float32; {args.repeats} interleaved "
      "repetitions, median ms per step; ratio = median of per-repetition ratios "
      "(hand-written / Flax). Agreement: after "
      f"{args.check_steps} step(s) from the same state, the largest difference from Flax's of "
      "a parameter or BatchNorm statistic, relative to its leaf's largest magnitude.", "",
      "| model | width | Flax (ms) | custom_vjp (ms) | custom_jvp (ms) | custom_vjp / Flax | "
      "custom_jvp / Flax | max rel. difference, vjp / jvp | loss, Flax / vjp / jvp |",
      "|---|---|---|---|---|---|---|---|---|"]
  for name, width, agree, t in rows:
    ms, r, d, loss = t["ms"], t["ratio"], agree["max_rel_diff"], agree["loss"]
    lines.append(f"| {name} | {pp.width_label(width)} | {ms['flax']:.1f} | "
                 f"{ms['custom_vjp']:.1f} | {ms['custom_jvp']:.1f} | {r['custom_vjp']:.3f} | "
                 f"{r['custom_jvp']:.3f} | {d['custom_vjp']:.1e} / {d['custom_jvp']:.1e} | "
                 f"{loss['flax']:.5f} / {loss['custom_vjp']:.5f} / {loss['custom_jvp']:.5f} |")
  lines += ["", f"Total {time.time() - t0:.0f} s."]
  if args.out:
    atomic.write_text(pathlib.Path(args.out), "\n".join(lines) + "\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
