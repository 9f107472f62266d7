"""Cost of scale-amended SGD on a residual network next to SGD: the update and the whole step.

ResNet-20 (``train.models``, option A) at ``--width``, batch ``--batch``: one jitted training
step (forward, backward with BatchNorm on batch statistics, update, parameters and optimizer
state donated) for SGD (Nesterov momentum 0.9, weight decay) and scale-amended SGD with each
input-scale reading; and the update alone (``tx.update`` + ``apply_updates``) on ResNet-56's
parameters. The configurations are interleaved, ``--reps`` samples each; a sample is the mean
of ``--calls`` back-to-back calls. Reported: the median ratio to SGD over repetitions, and the
ratio of the fastest samples (the least disturbed on a shared machine).

Usage::

  python benchmarks/residual_overhead.py --width 1 --batch 128 --reps 7
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_bm
from train import models

SAMPLE = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def optimizers(specs):
  sgd = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9, nesterov=True))
  return {"sgd": sgd,
          "scale_amended (propagated)": optax_bm.scale_amended_sgd(0.1, specs,
                                                                input_scale="propagated"),
          "scale_amended (unit)": optax_bm.scale_amended_sgd(0.1, specs, input_scale="unit")}


def step_fns(name, width, batch):
  model = models.create(name, 10, width=width, rngs=nnx.Rngs(0))
  specs = optax_bm.annotate(model, SAMPLE)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  kx, ky = jax.random.split(jax.random.key(0))
  images = jax.random.normal(kx, (batch, 32, 32, 3))
  labels = jax.random.randint(ky, (batch,), 0, 10)
  out = {}
  for label, tx in optimizers(specs).items():
    def step(params, opt_state, stats, tx=tx):
      def loss_fn(p):
        m = nnx.merge(graphdef, p, stats)
        logits = m(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
      (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, stats
    fn = jax.jit(step, donate_argnums=(0, 1, 2))
    state = [jax.tree.map(jnp.copy, params), tx.init(params), jax.tree.map(jnp.copy, stats)]
    out[label] = (fn, state)
  return out


def update_fns(name, width):
  model = models.create(name, 10, width=width, rngs=nnx.Rngs(0))
  specs = optax_bm.annotate(model, SAMPLE)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = jax.tree.map(lambda p: 1e-2 * jnp.ones_like(p), params)
  out = {}
  for label, tx in optimizers(specs).items():
    def upd(params, opt_state, tx=tx):
      u, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, u), opt_state
    fn = jax.jit(upd, donate_argnums=(0, 1))
    out[label] = (fn, [jax.tree.map(jnp.copy, params), tx.init(params)])
  return out


def bench(fns, reps, calls):
  times = {k: [] for k in fns}
  for fn, state in fns.values():  # warm up (compile)
    state[:] = fn(*state)
    jax.block_until_ready(state)
  labels = list(fns)
  for r in range(reps):
    for label in labels[r % len(labels):] + labels[:r % len(labels)]:
      fn, state = fns[label]
      t = time.perf_counter()
      for _ in range(calls):
        state[:] = fn(*state)
      jax.block_until_ready(state)
      times[label].append((time.perf_counter() - t) / calls)
  base = np.asarray(times["sgd"])
  for label, ts in times.items():
    ts = np.asarray(ts)
    print(f"  {label:28s} median {np.median(ts) * 1e3:8.2f} ms   ratio to SGD: median "
          f"{np.median(ts / base):.3f}, fastest {ts.min() / base.min():.3f}", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--calls", type=int, default=3)
  args = p.parse_args(argv)
  print(f"{jax.devices()[0].device_kind}; load {open('/proc/loadavg').read().split()[:3]}")
  print(f"whole step, resnet20 width {args.width:g}, batch {args.batch}:")
  bench(step_fns("resnet20", args.width, args.batch), args.reps, args.calls)
  print(f"update alone, resnet56 width {args.width:g} parameters:")
  bench(update_fns("resnet56", args.width), args.reps, 10 * args.calls)


if __name__ == "__main__":
  main()
