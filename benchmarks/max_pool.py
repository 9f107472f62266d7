"""The trainer's 2×2 max-pool (``train.models.max_pool_2x2``) against ``nnx.max_pool``.

Issue 21: at width 1/8 the profile of a VGG11 step (``benchmarks/throughput.py --profile``)
put 43 % of the op time in max-pooling: XLA:CPU runs ``reduce_window`` and its gradient
(select-and-scatter) in its generic loop emitter. ``max_pool_2x2`` computes the same values
and derivatives as a maximum of four strided quadrants. This script measures, in one process,
interleaved, median of ``--reps``:

* the pool alone, forward + backward, on the feature maps a VGG pools at each ``--widths``
  (batch ``--batch``);
* the trainer's whole training step (``train.steps.train_step``, SGD and scale-amended SGD)
  with each pool, for each ``--models`` at each width: the model built and the step compiled
  once with ``nnx.max_pool`` patched in ("before") and once as shipped ("after");
* with ``--epoch MODEL@WIDTH``, whole training epochs on the full CIFAR-10 with each pool.

Usage::

  python benchmarks/max_pool.py                      # vgg11, vgg13 at widths 1/8 and 1
  python benchmarks/max_pool.py --models vgg11 --widths 1/8 --reps 5 --out /tmp/pool.md
  python benchmarks/max_pool.py --epoch vgg13@1/8    # + whole epochs of Table 1's CPU run
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from benchmarks import peer_pytorch as pp  # noqa: E402  pylint: disable=wrong-import-position
from train import cli, models  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "max_pool.md"


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vgg11,vgg13", help="comma-separated VGGs")
  p.add_argument("--widths", default="1/8,1", help="comma-separated width multipliers")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--reps", type=int, default=7, help="interleaved samples of each side")
  p.add_argument("--sample-seconds", type=float, default=0.5)
  p.add_argument("--epoch", default=None, metavar="MODEL@WIDTH",
                 help="also time whole training epochs on the full CIFAR-10 with each pool, "
                      "e.g. vgg13@1/8 (Table 1's CPU run): the trainer's EpochRunner, SGD")
  p.add_argument("--epoch-repeats", type=int, default=2, help="epochs of each side")
  p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10" /
                                           "cifar-10-batches-py"),
                 help="CIFAR-10 python version for --epoch (default ../shared/data/cifar10/"
                      "cifar-10-batches-py relative to the repository)")
  p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (written atomically)")
  args = p.parse_args(argv)
  if args.epoch is not None:
    model, _, width = args.epoch.partition("@")
    try:
      args.epoch = (model, pp.parse_width(width or "1"))
    except pp.UsageError:
      p.error(f"--epoch {args.epoch!r}: expected MODEL@WIDTH, e.g. vgg13@1/8")
  args.models = args.models.split(",")
  for m in args.models:
    if m not in models.CFGS:
      p.error(f"--models: unknown VGG {m!r}; choose from {', '.join(models.CFGS)}")
  try:
    args.widths = [pp.parse_width(w) for w in args.widths.split(",")]
  except pp.UsageError as e:
    p.error(str(e))
  if any(not 0 < w <= 1 for w in args.widths) or args.batch < 1 or args.reps < 1:
    p.error("--widths must be in (0, 1], --batch and --reps at least 1")
  return args


def _nnx_pool(x):
  """The pool the trainer used before: ``nnx.max_pool``'s 2×2 / stride-2 ("before")."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def pool_shapes(width: float, batch: int) -> list:
  """The NHWC maps a VGG pools: 32, 16, 8, 4, 2 pixels at 64·w .. 512·w channels."""
  chans = (64, 128, 256, 512, 512)
  return [(batch, 32 >> i, 32 >> i, models.scaled_channels(c, width))
          for i, c in enumerate(chans)]


def bench_pool(args, oo) -> list:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rows = []
  for width in args.widths:
    for shape in pool_shapes(width, args.batch):
      x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
      ct = jnp.ones((shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
      chains = {}
      for name, pool in (("nnx.max_pool", _nnx_pool), ("max_pool_2x2", models.max_pool_2x2)):
        fn = jax.jit(lambda x, ct, pool=pool: (x, jax.vjp(pool, x)[1](ct)[0]))
        chains[name] = oo.Chain(fn, (x,), (ct,), 1)
        chains[name].calibrate(args.sample_seconds / 5)
      times = oo.interleaved(chains, args.reps)
      rows.append((width, shape, {n: float(np.median(t)) for n, t in times.items()}))
      print(f"  pool {shape}: " + ", ".join(f"{n} {1e3 * v:.2f} ms"
                                           for n, v in rows[-1][2].items()), flush=True)
  return rows


def bench_steps(args, oo) -> list:
  import jax  # pylint: disable=import-outside-toplevel
  from train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  shipped = models.max_pool_2x2
  rows = []
  for name in args.models:
    for width in args.widths:
      images, labels = oo.fake_batch(batch=args.batch)
      chains = {}
      for opt in ("sgd", "scale_amended"):
        for side, pool in (("before", _nnx_pool), ("after", shipped)):
          models.max_pool_2x2 = pool  # read when the model is traced, i.e. compiled below
          try:
            _, setup, state, _ = pp.trainer_state(name, width, opt, args.batch)
            fn = jax.jit(functools.partial(steps_lib.train_step, setup=setup),
                         donate_argnums=(0,)).lower(state, images, labels).compile()
          finally:
            models.max_pool_2x2 = shipped
          chains[(opt, side)] = oo.Chain(fn, (state,), (images, labels), 1)
          chains[(opt, side)].calibrate(args.sample_seconds, max_k=50)
      times = oo.interleaved(chains, args.reps)
      med = {k: float(np.median(t)) for k, t in times.items()}
      ratio = {opt: float(np.median(np.asarray(times[(opt, "after")])
                                    / np.asarray(times[(opt, "before")])))
               for opt in ("sgd", "scale_amended")}
      rows.append((name, width, med, ratio))
      print(f"  step {name} w{pp.width_label(width)}: " + ", ".join(
          f"{o} {1e3 * med[(o, 'before')]:.1f} -> {1e3 * med[(o, 'after')]:.1f} ms"
          for o in ("sgd", "scale_amended")), flush=True)
  return rows


def bench_epoch(args) -> dict:
  """Seconds per training epoch (full CIFAR-10, SGD) with each pool, epochs interleaved."""
  # pylint: disable=import-outside-toplevel
  import jax
  from train import config as config_lib, pipeline, steps as steps_lib
  name, width = args.epoch
  shipped = models.max_pool_2x2
  mesh = pipeline.make_mesh()
  config = config_lib.Config(model=name, width=width, optimizer="sgd", batch_size=args.batch,
                             lr=0.1, data_dir=args.data_dir).resolved()
  data = pipeline.load_data(config, mesh, pipeline.pad_to(1000, mesh.devices.size))
  steps_per_epoch = data.num_train // args.batch
  sides = {}
  for side, pool in (("before", _nnx_pool), ("after", shipped)):
    config, setup, state, _ = pp.trainer_state(name, width, "sgd", args.batch, steps_per_epoch,
                                               args.data_dir)
    state = pipeline.replicate(state, mesh)
    runner = steps_lib.EpochRunner(setup, mesh, config, data, steps_per_epoch,
                                   pipeline.pad_to(1000, mesh.devices.size), steps_per_call=1)
    models.max_pool_2x2 = pool
    try:
      runner.compile(state)
    finally:
      models.max_pool_2x2 = shipped
    sides[side] = [runner, state]
  # The "before" step has the five pools' reduce-windows (and XLA:CPU expands their derivative,
  # select-and-scatter, into other ops); reduce-window may also come from elsewhere in the
  # step (a cumulative sum), so compare the two steps' counts.
  counts = {side: r.train_fns[1].as_text().count("reduce-window(")
            for side, (r, _) in sides.items()}
  if counts["before"] <= counts["after"]:
    raise AssertionError(f"epoch: the two compiled steps do not differ in their pools ({counts})")
  times = {"before": [], "after": []}
  for r in range(args.epoch_repeats):
    for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
      runner, state = sides[side]
      t0 = time.perf_counter()
      state, sums = runner.train_epoch(state, r)
      jax.block_until_ready((state, sums))
      times[side].append(time.perf_counter() - t0)
      sides[side][1] = state
      print(f"  epoch {name} w{pp.width_label(width)} {side}: {times[side][-1]:.1f} s", flush=True)
  return {"model": name, "width": width, "images": data.num_train, "times": times}


def report(args, argv, oo, pool_rows, step_rows, loads, seconds, epoch=None) -> str:
  cmd = "python benchmarks/max_pool.py" + "".join(f" {a}" for a in argv)
  lines = ["# 2×2 max-pool: `train.models.max_pool_2x2` against `nnx.max_pool` (issue 21)", "",
           f"Command: `{cmd}`", "", oo.machine_line().replace(str(ROOT), "."), "",
           f"{loads[0]}; {loads[1]}.", "",
           ("**Measured while the machine was loaded (indicative; rerun on a quiet machine).** "
            "The sides are interleaved, so load affects both alike: read the ratios first."
            if max(float(loads[0].split(": ")[1].split()[0]),
                   float(loads[1].split(": ")[1].split()[0])) > 0.5 * (os.cpu_count() or 1)
            else "Machine quiet (load average at most half the cores)."), "",
           f"## The pool alone, forward + backward, batch {args.batch}, median of {args.reps}",
           "", "| width | map (N, H, W, C) | nnx.max_pool ms | max_pool_2x2 ms | speed-up |",
           "|---|---|---|---|---|"]
  for width, shape, med in pool_rows:
    lines.append(f"| {pp.width_label(width)} | {shape} | {1e3 * med['nnx.max_pool']:.2f} | "
                 f"{1e3 * med['max_pool_2x2']:.2f} | "
                 f"{med['nnx.max_pool'] / med['max_pool_2x2']:.1f}× |")
  lines += ["", f"## The trainer's training step, batch {args.batch}, median of {args.reps} "
            "interleaved samples", "",
            "Same model, same optimizer, same batch; only the pool differs (\"before\": "
            "`nnx.max_pool`, \"after\": `max_pool_2x2`). Ratio: median over repetitions of "
            "after / before.", "",
            "| model | width | SGD before ms | SGD after ms | SGD after / before | scale-amended "
            "before ms | scale-amended after ms | scale-amended after / before |",
            "|---|---|---|---|---|---|---|---|"]
  for name, width, med, ratio in step_rows:
    lines.append(
        f"| {name} | {pp.width_label(width)} | {1e3 * med[('sgd', 'before')]:.1f} | "
        f"{1e3 * med[('sgd', 'after')]:.1f} | {ratio['sgd']:.3f} | "
        f"{1e3 * med[('scale_amended', 'before')]:.1f} | "
        f"{1e3 * med[('scale_amended', 'after')]:.1f} | {ratio['scale_amended']:.3f} |")
  if epoch is not None:
    t = epoch["times"]
    lines += ["", f"## Whole training epochs: {epoch['model']} width "
              f"{pp.width_label(epoch['width'])}, full CIFAR-10 ({epoch['images']} images), SGD, batch {args.batch}", "",
              "The trainer's `EpochRunner` (data on the device, augmentation inside the jitted "
              "step, one step per call), epochs of the two sides interleaved; seconds per "
              "epoch, every epoch listed.", "",
              "| pool | seconds per epoch | median |", "|---|---|---|"]
    for side, label in (("before", "nnx.max_pool"), ("after", "max_pool_2x2")):
      lines.append(f"| {label} | {', '.join(f'{x:.1f}' for x in t[side])} | "
                   f"{float(np.median(t[side])):.1f} |")
    lines += ["", f"after / before: {float(np.median(t['after'])) / float(np.median(t['before'])):.3f}."]
  lines += ["", f"Total {seconds:.0f} s.", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  cli.set_cpu_xla_flags()  # the trainer's flags, before the first computation
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  loads = [oo.load_line("at start")]
  pool_rows = bench_pool(args, oo)
  step_rows = bench_steps(args, oo)
  epoch = bench_epoch(args) if args.epoch else None
  loads.append(oo.load_line("at the end"))
  text = report(args, argv, oo, pool_rows, step_rows, loads, time.time() - t0, epoch)
  pp.write_atomic(pathlib.Path(args.out), text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
