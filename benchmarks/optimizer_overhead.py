"""Cost of scale-amended SGD next to SGD, LARS and LSALR: the update alone and the whole step.

Two measurements, each a ratio to SGD (Nesterov momentum + weight decay) taken in the same run:

1. **Update alone**, on VGG16-BN's parameters (full width: 14.7 M parameters, 41 leaves): one
   jitted ``tx.update`` + ``optax.apply_updates`` with the parameters and optimizer state
   donated (as a trainer does), fed back call after call, ``block_until_ready`` at the end.
2. **Whole training step** (forward, backward, update; BatchNorm in training mode, batch on
   the device) of VGG11 and VGG16 at batch 128: the trainer's own ``train.steps.train_step``. Full width is
   slow on a small CPU: ``--width`` sets the channel multiplier and every table says which
   width it measured.

Timing: every configuration is warmed up, then measured ``--reps`` times, the configurations
interleaved (their order rotated every repetition) so that each repetition's ratio to SGD
compares neighbours in time; a sample is ``k`` back-to-back calls (``k`` calibrated to about
``--sample-seconds``) divided by ``k``. Reported: the median of the per-repetition ratios,
their interquartile range and min-max, and the ratio of the fastest samples (the least
disturbed by other processes on a shared machine); a target verdict uses the median ratio. Timed loops run under ``jax.transfer_guard("disallow")``
(no host transfers) and the jitted functions' cache sizes are checked afterwards (no
retracing). The load average is printed before and after each section because the machine
may be shared.

The whole step is measured as the trainer runs it, with the trainer's XLA:CPU flags
(``train.cli.CPU_XLA_FLAGS``: the concurrency-optimized scheduler off);
``--xla-default-scheduler`` keeps XLA's default.

Usage::

  python benchmarks/optimizer_overhead.py            # update at width 1, steps at width 1
  python benchmarks/optimizer_overhead.py --quick    # CI scale: fewer reps, VGG11 step at width 1/8
  python benchmarks/optimizer_overhead.py --width 0.5 --reps 7 --dump-hlo /tmp/hlo
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a fresh checkout
  sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_bm
from train import models

OPTIMIZERS = ("sgd", "lars", "lsalr", "scale_amended")
LABELS = {
    "sgd": "SGD (Nesterov, wd 1e-3)",
    "lars": "optax.lars",
    "lsalr": "optax_bm.lsalr",
    "scale_amended": "optax_bm.scale_amended_sgd",
}
# Targets of issue 6: (goal, stretch) for the ratio to SGD.
UPDATE_TARGET = (1.5, 1.25)
STEP_TARGET = (1.03, 1.01)
BATCH = 128
NUM_CLASSES = 10
SAMPLE_SHAPE = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Machine and statistics


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return platform.processor() or "unknown CPU"


def machine_line() -> str:
  dev = jax.devices()[0]
  kind = "CPU" if dev.platform == "cpu" else dev.device_kind
  return (f"machine: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}, backend "
          f"{jax.default_backend()} ({len(jax.devices())} device(s), {kind}); "
          f"{'CPU figures' if dev.platform == 'cpu' else 'accelerator figures'}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def load_line(when: str) -> str:
  one, five, fifteen = os.getloadavg()
  return f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


def quantiles(xs: Sequence[float]) -> dict:
  a = np.asarray(xs, np.float64)
  return {"median": float(np.median(a)), "q1": float(np.percentile(a, 25)),
          "q3": float(np.percentile(a, 75)), "min": float(a.min()), "max": float(a.max()),
          "n": int(a.size)}


def fmt_ratio(q: dict) -> str:
  return (f"{q['median']:.3f} [{q['q1']:.3f}-{q['q3']:.3f}] "
          f"({q['min']:.3f}-{q['max']:.3f})")


def fmt_ms(q: dict) -> str:
  return f"{1e3 * q['median']:.{1 if q['median'] >= 0.1 else 2}f} [{1e3 * q['q1']:.4g}-{1e3 * q['q3']:.4g}]"


def short_verdict(ratio: float, target: tuple) -> str:
  goal, stretch = target
  return "met + stretch" if ratio <= stretch else "met" if ratio <= goal else "MISSED"


def verdict(ratio: float, target: tuple) -> str:
  goal, stretch = target
  if ratio <= stretch:
    return f"met (≤{goal:g}×, stretch ≤{stretch:g}× too)"
  if ratio <= goal:
    return f"met (≤{goal:g}×; stretch {stretch:g}× missed)"
  return f"MISSED (>{goal:g}×)"


# ---------------------------------------------------------------------------------------------
# Timing


class Chain:
  """Calls ``fn(*carry, *args)`` back to back, feeding the first ``n_carry`` outputs back.

  The carried buffers are donated by ``fn``, so each call reuses the previous call's memory
  as a training loop does; ``block_until_ready`` on the last output ends a sample.
  """

  def __init__(self, fn: Callable, carry: tuple, args: tuple, n_carry: int):
    self.fn, self.carry, self.args, self.n_carry = fn, tuple(carry), tuple(args), n_carry
    self.k = 1

  def __call__(self, k: Optional[int] = None) -> float:
    k = self.k if k is None else k
    carry = self.carry
    t0 = time.perf_counter()
    for _ in range(k):
      out = self.fn(*carry, *self.args)
      carry = tuple(out[:self.n_carry])
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    self.carry = carry
    return dt / k

  def calibrate(self, sample_seconds: float, max_k: int = 1000) -> float:
    """Warm-up calls, then ``k`` so that one sample lasts about ``sample_seconds``."""
    self(1)  # compile-free warm-up: first execution, allocations
    t = self(1)
    if t < sample_seconds:
      t = min(t, self(1))
    self.k = int(min(max_k, max(1, math.ceil(sample_seconds / max(t, 1e-6)))))
    return t


def interleaved(chains: dict, reps: int) -> dict:
  """``reps`` samples of every chain, the order rotated every repetition; name -> [seconds]."""
  names = list(chains)
  times = {n: [] for n in names}
  with jax.transfer_guard("disallow"):
    for r in range(reps):
      order = names[r % len(names):] + names[:r % len(names)]
      for n in order:
        times[n].append(chains[n]())
  return times


def ratios_to(times: dict, base: str) -> dict:
  return {n: quantiles([t / b for t, b in zip(ts, times[base])]) for n, ts in times.items()}


def cache_size(fn) -> Optional[int]:
  try:
    return fn._cache_size()  # pylint: disable=protected-access
  except AttributeError:
    return None


# ---------------------------------------------------------------------------------------------
# HLO


def entry_text(hlo: str) -> str:
  i = hlo.find("\nENTRY")
  return hlo[i:] if i >= 0 else hlo


def hlo_stats(compiled, param_bytes: int) -> dict:
  """Fusions and top-level ops of the entry computation; bytes accessed per parameter byte."""
  hlo = compiled.as_text()
  entry = entry_text(hlo)
  lines = [l for l in entry.splitlines() if " = " in l and "parameter(" not in l]
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  header = hlo[:hlo.find("\n")]
  try:
    temp = float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    temp = float("nan")
  return {
      "temp_bytes": temp,
      "fusions": sum(" fusion(" in l for l in lines),
      "library_fusions": sum("kind=kCustom" in l for l in lines),
      "copies": sum(" copy(" in l for l in lines),
      "convolutions": sum(" convolution(" in l for l in lines),
      "swapped_convolutions": sum(" convolution(" in l and "rhs_reversal" in l for l in lines),
      "aliased_outputs": header.count("-alias)"),
      "flops": float(cost.get("flops", float("nan"))),
      "bytes": float(cost.get("bytes accessed", float("nan"))),
      "passes": float(cost.get("bytes accessed", float("nan"))) / max(param_bytes, 1),
  }


# ---------------------------------------------------------------------------------------------
# Optimizers and steps


def make_tx(name: str, specs: Any = None) -> optax.GradientTransformation:
  """The four optimizers with the paper's settings (issue 6)."""
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(1e-3),
                       optax.sgd(0.1, momentum=0.9, nesterov=True))
  if name == "lars":
    return optax.lars(2.0, weight_decay=1e-3, trust_coefficient=1e-3, momentum=0.9,
                      nesterov=True)
  if name == "lsalr":
    return optax_bm.lsalr(0.1, weight_decay=1e-3, momentum=0.9, nesterov=True)
  if name == "scale_amended":
    return optax_bm.scale_amended_sgd(0.1, specs, momentum=0.9, nesterov=True,
                                      weight_decay=5e-3)
  raise ValueError(f"unknown optimizer {name!r}")


def vgg_params(name: str, width: float, seed: int = 0):
  model = models.vgg(name, NUM_CLASSES, width, rngs=nnx.Rngs(seed))
  specs = optax_bm.annotate(model, SAMPLE_SHAPE)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return model, specs, params


def train_state_and_step(model_name: str, width: float, optimizer: str, dtype=jnp.float32,
                         small_map_conv: Optional[bool] = None):
  """``(step_fn(state, images, labels) -> (state, metrics), state, source description)``.

  Always the trainer's own ``train.steps.train_step`` with its optimizer factory (paper
  settings): the benchmark measures the step users run, and fails loudly if it breaks.
  ``small_map_conv`` as in ``train.models.vgg`` (``None``: the trainer's default).
  """
  # pylint: disable-next=import-outside-toplevel
  from train import config as config_lib, state as state_lib, steps as steps_lib
  dtype_name = {jnp.float32: "float32", jnp.bfloat16: "bfloat16"}[dtype]
  config = config_lib.Config(model=model_name, width=width, optimizer=optimizer,
                             lr=config_lib.PAPER_SETTINGS[optimizer][0],
                             batch_size=BATCH, compute_dtype=dtype_name).resolved()
  setup, state = state_lib.create_train_state(config, NUM_CLASSES, 390,
                                              small_map_conv=small_map_conv)
  step = functools.partial(steps_lib.train_step, setup=setup)
  return step, state, "train.steps.train_step (the trainer's step)"


def fake_batch(dtype=jnp.float32, batch: int = BATCH, seed: int = 0):
  kx, ky = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32).astype(dtype)
  labels = jax.random.randint(ky, (batch,), 0, NUM_CLASSES, jnp.int32)
  return images, labels


# ---------------------------------------------------------------------------------------------
# Sections


def bench_update(names: Sequence[str], width: float, reps: int, sample_seconds: float,
                 dump_hlo: Optional[str] = None, model_name: str = "vgg16") -> dict:
  _, specs, params = vgg_params(model_name, width)
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  param_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(params))
  keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
  grads = jax.tree.unflatten(jax.tree.structure(params), [
      1e-2 * jax.random.normal(k, p.shape, p.dtype)
      for k, p in zip(keys, jax.tree.leaves(params))])
  chains, jitted, info = {}, {}, {}
  for name in names:
    tx = make_tx(name, specs)

    def update(params, opt_state, grads, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    fn = jax.jit(update, donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    t0 = time.perf_counter()
    compiled = fn.lower(p, s, grads).compile()
    info[name] = {"compile_s": time.perf_counter() - t0, **hlo_stats(compiled, param_bytes)}
    if dump_hlo:
      os.makedirs(dump_hlo, exist_ok=True)
      pathlib.Path(dump_hlo, f"update_{model_name}_w{width:g}_{name}.hlo.txt").write_text(
          compiled.as_text())
    jitted[name] = fn
    chains[name] = Chain(fn, (p, s), (grads,), 2)
  for c in chains.values():
    c.calibrate(sample_seconds)
  times = interleaved(chains, reps)
  return {"times": {n: quantiles(t) for n, t in times.items()},
          "ratios": ratios_to(times, "sgd"), "info": info,
          "k": {n: c.k for n, c in chains.items()},
          "retraces": {n: (cache_size(f) or 1) - 1 for n, f in jitted.items()},
          "n_params": n_params, "n_leaves": len(jax.tree.leaves(params)), "width": width,
          "model": model_name}


def bench_steps(model_name: str, names: Sequence[str], width: float, reps: int,
                sample_seconds: float) -> dict:
  images, labels = fake_batch()
  chains, jitted, info, sources = {}, {}, {}, set()
  for name in names:
    step, state, src = train_state_and_step(model_name, width, name)
    sources.add(src)
    fn = jax.jit(step, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, images, labels).compile()
    param_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state["params"]))
    info[name] = {"compile_s": time.perf_counter() - t0, **hlo_stats(compiled, param_bytes)}
    jitted[name] = fn
    chains[name] = Chain(fn, (state,), (images, labels), 1)
  for c in chains.values():
    c.calibrate(sample_seconds, max_k=50)
  times = interleaved(chains, reps)
  # The steps differ only in the update: its cost measured alone, on this model's parameters
  # in the same run, predicts the step ratio far more precisely than the noisy steps do.
  upd = bench_update(names, width, max(reps, 5), min(sample_seconds, 0.2), model_name=model_name)
  sgd_step = quantiles(times["sgd"])["median"]
  derived = {n: 1.0 + (upd["times"][n]["median"] - upd["times"]["sgd"]["median"]) / sgd_step
             for n in names}
  return {"times": {n: quantiles(t) for n, t in times.items()},
          "ratios": ratios_to(times, "sgd"), "info": info,
          "k": {n: c.k for n, c in chains.items()},
          "retraces": {n: (cache_size(f) or 1) - 1 for n, f in jitted.items()},
          "source": "; ".join(sorted(sources)), "model": model_name, "width": width,
          "update_ms": {n: 1e3 * upd["times"][n]["median"] for n in names},
          "derived": derived}


def print_update_table(res: dict, reps: int) -> None:
  print(f"\n### Optimizer update alone: {res['model'].upper()}-BN parameters, width {res['width']:g} "
        f"({res['n_params'] / 1e6:.2f} M parameters, {res['n_leaves']} leaves), "
        f"jitted + donated, {reps} interleaved reps\n")
  print("| optimizer | update ms, median [IQR] | ratio to SGD, median [IQR] (min-max) | "
        "ratio of minima | target | fusions | bytes accessed / param bytes | temp MB | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for n, q in res["times"].items():
    r, i = res["ratios"][n], res["info"][n]
    if n == "sgd":
      target = "baseline"
    elif n == "scale_amended":
      lars = res["ratios"].get("lars")
      vs_lars = ("" if lars is None else
                 f"; {'≤' if r['median'] <= lars['median'] else '>'} LARS")
      target = verdict(r["median"], UPDATE_TARGET) + vs_lars
    else:
      target = "-"
    print(f"| {LABELS[n]} | {fmt_ms(q)} | {fmt_ratio(r)} | "
          f"{q['min'] / res['times']['sgd']['min']:.3f} | {target} | {i['fusions']} | "
          f"{i['passes']:.1f} | {i['temp_bytes'] / 2**20:.1f} | {i['compile_s']:.1f} |")
  print(f"\nsamples: {', '.join(f'{n} k={k}' for n, k in res['k'].items())} calls each; "
        f"retraces after warm-up: {sum(res['retraces'].values())}; "
        f"donated outputs aliased: "
        f"{', '.join(n + ' ' + str(i['aliased_outputs']) for n, i in res['info'].items())}; "
        f"top-level copies: {sum(i['copies'] for i in res['info'].values())}")


def print_step_table(results: list, reps: int) -> None:
  width = results[0]["width"]
  label = "full width" if width == 1 else f"width {width:g} (NOT full width)"
  print(f"\n### Whole training step (forward + backward + update), batch {BATCH}, {label}, "
        f"{reps} interleaved reps\n")
  print("| model | optimizer | step ms, median [IQR] | ratio to SGD, median [IQR] (min-max) | "
        "ratio of minima | update alone, ms | derived ratio | target (measured; derived) | "
        "compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for res in results:
    for n, q in res["times"].items():
      r, i, d = res["ratios"][n], res["info"][n], res["derived"][n]
      if n == "sgd":
        target = "baseline"
      elif n == "scale_amended":
        target = (f"{short_verdict(r['median'], STEP_TARGET)}; "
                  f"{short_verdict(d, STEP_TARGET)}")
      else:
        target = "-"
      print(f"| {res['model']} | {LABELS[n]} | {fmt_ms(q)} | {fmt_ratio(r)} | "
            f"{q['min'] / res['times']['sgd']['min']:.3f} | {res['update_ms'][n]:.2f} | "
            f"{d:.4f} | {target} | {i['compile_s']:.1f} |")
  print("\nderived ratio = 1 + (update alone − SGD's update alone) / SGD's step, medians of "
        "this run (the steps differ only in the update); targets ≤ "
        f"{STEP_TARGET[0]:g}× (met), stretch ≤ {STEP_TARGET[1]:g}× (met + stretch).")
  for res in results:
    i = res["info"]["sgd"]
    print(f"\n{res['model']}: step = {res['source']}; k = "
          f"{', '.join(f'{n} {k}' for n, k in res['k'].items())}; retraces after warm-up: "
          f"{sum(res['retraces'].values())}; XLA flops/step {i['flops'] / 1e9:.1f} G; "
          f"top-level (non-library) convolutions: {i['convolutions']}, of which "
          f"{i['swapped_convolutions']} operand-swapped (XLA:CPU's generic loop emitter)")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="CI scale: 3 reps, short samples, steps of VGG11 only at width 1/8")
  p.add_argument("--width", type=float, default=None,
                 help="channel multiplier of the whole-step models (default 1, quick 0.125)")
  p.add_argument("--update-width", type=float, default=1.0,
                 help="channel multiplier of the VGG16 whose parameters the update runs on")
  p.add_argument("--models", default=None,
                 help="whole-step models, comma-separated (default vgg11,vgg16; quick vgg11)")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help="comma-separated subset (SGD is always measured: it is the baseline)")
  p.add_argument("--reps", type=int, default=None, help="repetitions of the update alone (default 9, quick 5)")
  p.add_argument("--step-reps", type=int, default=None,
                 help="repetitions of the whole step (default 11, quick 3)")
  p.add_argument("--sample-seconds", type=float, default=None,
                 help="target length of one sample (default 0.5, quick 0.2)")
  p.add_argument("--skip-update", action="store_true")
  p.add_argument("--skip-steps", action="store_true")
  p.add_argument("--xla-default-scheduler", action="store_true",
                 help="keep XLA:CPU's concurrency-optimized scheduler (the trainer turns it off: "
                      "train.cli.CPU_XLA_FLAGS)")
  p.add_argument("--dump-hlo", default=None, help="write the updates' optimized HLO here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not args.xla_default_scheduler:
    from train import cli  # pylint: disable=import-outside-toplevel
    cli.set_cpu_xla_flags()  # the trainer's flags, set before the first computation
  width = args.width if args.width is not None else (0.125 if args.quick else 1.0)
  reps = args.reps or (5 if args.quick else 9)
  step_reps = args.step_reps or (3 if args.quick else 11)
  sample_s = args.sample_seconds if args.sample_seconds is not None else (0.2 if args.quick else 0.5)
  names = ["sgd"] + [n for n in args.optimizers.split(",") if n and n != "sgd"]
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown:
    print(f"error: unknown optimizer(s) {unknown}; choose from {OPTIMIZERS}", file=sys.stderr)
    return 2
  models_arg = args.models if args.models is not None else ("vgg11" if args.quick else "vgg11,vgg16")
  model_names = [m for m in models_arg.split(",") if m]
  t_start = time.perf_counter()
  print(f"# optimizer_overhead{' --quick' if args.quick else ''}")
  print(machine_line())
  print(load_line("at start"))
  if not args.skip_update:
    res = bench_update(names, args.update_width, reps, sample_s, args.dump_hlo)
    print_update_table(res, reps)
    print(load_line("after the update benchmark"))
  if not args.skip_steps and model_names:
    results = [bench_steps(m, names, width, step_reps, sample_s)
               for m in model_names]
    print_step_table(results, step_reps)
    print(load_line("after the step benchmark"))
  print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
