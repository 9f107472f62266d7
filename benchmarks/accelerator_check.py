"""One command that checks a GPU or TPU end to end, and writes what it found.

On whatever devices JAX finds, in this order (each section prints as it finishes):

1. **Devices**: platform, kinds, count, memory, versions of jax/jaxlib/flax/optax.
2. **Matmul rate**: a large jitted ``a @ b`` in float32 and bfloat16 (default precision, as
   training runs), FLOP/s from the timed calls.
3. **Correctness on the device** (float32, ``jax.default_matmul_precision("highest")``):
   ``optax_bm.scale_by_back_matching`` on a VGG11-BN equals the block-by-block ``"scalar"``
   back-matching step of ``optax_bm.backmatching.back_matching_step``
   (docs/method.md#2-back-matching-propagation), and differs from the raw gradient (so the
   check can fail); a data-parallel step of the trainer's own ``train.steps.train_step``
   sharded over every device equals the same step on one device.
4. **Training throughput**: the trainer's ``train.steps.make_train_steps`` with a whole chunk
   of steps as one ``lax.scan`` (how the trainer runs an epoch on an accelerator), VGG11 and
   VGG16 at full width, batch 128, float32 and bfloat16, on a synthetic device-resident uint8
   data set (gather, random crop + flip, normalize and the step, as in training): steps/s,
   images/s, and the fraction of the measured matmul rate of the same dtype that the step's
   FLOPs (XLA's cost analysis of one step) reach; SGD and scale-amended SGD interleaved, so
   their step-time ratio comes from neighbouring calls.
5. **A short real training run** (``--data-dir``): ``train.cifar.train_and_evaluate`` for
   ``--train-epochs`` epochs in a temporary work directory; seconds and images/s per epoch
   (compilation excluded), test accuracy.

The report goes to stdout and, written atomically, to ``--out``/``accelerator_<platform>.md``
and ``.json``. Exit status: 0 when every correctness check passed, 1 when one failed or the
data cannot be used (one ``error:`` line, checked before anything else runs), 2 for bad flags.

Usage::

  python benchmarks/accelerator_check.py --data-dir ~/data/cifar10     # GPU/TPU, < 8 min
  python benchmarks/accelerator_check.py --data-dir DIR --allow-subset # a CIFAR subset
  python benchmarks/accelerator_check.py --quick --data-dir sample      # CPU smoke run

``--quick`` is the test suite's CPU smoke run: VGG11 at width 1/16, 2 scanned steps, one timed
call per optimizer, one epoch on at most 256 training images of ``--data-dir`` if given; its
figures mean nothing, it exercises every section. Only public JAX APIs, nothing to install: it
runs with the JAX a GPU machine already has.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a fresh checkout
  sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH = 128
NUM_CLASSES = 10
DTYPES = ("float32", "bfloat16")
EQUIV_TOL = 1e-4  # relative error, float32 at "highest" matmul precision
SHARD_TOL = 1e-4
# A θ-step's learning rate large enough that (θ - θ_new) / η recovers the direction to float32
# precision: with η = 0.1 the subtraction would cancel most of the direction's digits. The
# z-steps of back-matching do not depend on η (step 1), so this changes nothing else.
EQUIV_LR = 1e4


def _now() -> float:
  return time.perf_counter()


def _rel_err(a, b) -> float:
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def flops_of(cost: Any) -> float:
  """FLOPs from a ``cost_analysis()`` result: a dict, a list of dicts (older JAX), or None."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  try:
    value = float((cost or {}).get("flops", float("nan")))
  except (AttributeError, TypeError, ValueError):
    return float("nan")
  return value if value > 0 else float("nan")


def step_flops(lowered) -> float:
  """XLA's FLOP count of a lowered computation: from the lowering if the backend gives it,
  else from the compiled executable."""
  for get in (lambda: lowered.cost_analysis(), lambda: lowered.compile().cost_analysis()):
    try:
      value = flops_of(get())
    except Exception:  # pylint: disable=broad-except
      value = float("nan")  # an API this JAX lacks, or a backend without cost analysis
    if not math.isnan(value):
      return value
  return float("nan")


def _atomic_write(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def _json_safe(x):
  """NaN and infinities as null: the report is strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _median(xs) -> float:
  return float(np.median(np.asarray(xs, np.float64)))


# --------------------------------------------------------------------------------------------
# 1. Devices


def devices_info() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  devs = jax.devices()
  info = {"platform": devs[0].platform, "backend": jax.default_backend(),
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(),
          "kinds": sorted({d.device_kind for d in devs}),
          "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "flax": flax.__version__, "optax": optax.__version__,
                       "python": platform.python_version()},
          "host": f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores",
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
  memory = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    if stats.get("bytes_limit"):
      memory.append(round(stats["bytes_limit"] / 2 ** 30, 1))
  info["memory_gib"] = memory
  return info


# --------------------------------------------------------------------------------------------
# 2. Matmul rate


def _calibrated_times(call: Callable[[], Any], min_s: float, reps: int,
                      max_k: int = 4096) -> tuple:
  """(k, [seconds of k back-to-back calls] × reps): k grows until k calls take ≥ min_s."""
  jax.block_until_ready(call())
  k = 1
  while True:
    t0 = _now()
    out = None
    for _ in range(k):
      out = call()
    jax.block_until_ready(out)
    dt = _now() - t0
    if dt >= min_s or k >= max_k:
      break
    k = min(max_k, max(2 * k, int(math.ceil(k * min_s / max(dt, 1e-6)))))
  times = []
  for _ in range(reps):
    t0 = _now()
    for _ in range(k):
      out = call()
    jax.block_until_ready(out)
    times.append(_now() - t0)
  return k, times


def matmul_rate(n: int, dtype: str, min_s: float, reps: int) -> dict:
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)
  fn = jax.jit(lambda a, b: a @ b)
  k, times = _calibrated_times(lambda: fn(a, b), min_s, reps)
  flop = 2.0 * n ** 3
  rates = [flop * k / t for t in times]
  return {"n": n, "dtype": dtype, "calls_per_sample": k, "flops_per_s": _median(rates),
          "flops_per_s_max": float(max(rates)), "seconds_per_matmul": _median(times) / k}


# --------------------------------------------------------------------------------------------
# 3. Correctness


def _state(model: str, width: float, optimizer: str, dtype: str = "float32",
           steps_per_epoch: int = 10):
  # pylint: disable-next=import-outside-toplevel
  from train import config as config_lib, state as state_lib
  config = config_lib.Config(model=model, width=width, optimizer=optimizer, batch_size=BATCH,
                             compute_dtype=dtype, epochs=1).resolved()
  setup, state = state_lib.create_train_state(config, NUM_CLASSES, steps_per_epoch)
  return config, setup, state


def check_transform_equals_backmatching(model_name: str, width: float, batch: int) -> dict:
  """``scale_by_back_matching``'s update == the "scalar" back-matching direction, per block."""
  import optax_bm  # pylint: disable=import-outside-toplevel
  from optax_bm import backmatching  # pylint: disable=import-outside-toplevel
  _, setup, state = _state(model_name, width, "sgd")
  model = nnx.merge(setup.graphdef, state["params"], state["batch_stats"])
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)

  def loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           y).mean()

  with jax.default_matmul_precision("highest"):
    specs = optax_bm.annotate(model, x)
    n = len(model.blocks)
    block_modules = list(model.blocks) + [model.classifier]
    fns, params = backmatching.nnx_blocks(block_modules)
    block_specs = [specs["blocks"][b] for b in range(n)] + [specs["classifier"]]
    new_params = jax.jit(lambda ps: backmatching.back_matching_step(
        fns, ps, x, loss, EQUIV_LR, solver="scalar", specs=block_specs).params)(params)
    want = [jax.tree.map(lambda p, q: (p - q) / EQUIV_LR, nnx.to_pure_dict(p),
                         nnx.to_pure_dict(q)) for p, q in zip(params, new_params)]

    graphdef, full, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest, copy=True)(x))))(full)
    tx = optax_bm.scale_by_back_matching(specs)
    pure_params, pure_grads = nnx.to_pure_dict(full), nnx.to_pure_dict(grads)
    updates, _ = jax.jit(tx.update)(pure_grads, tx.init(pure_params), pure_params)

  def per_block(tree):
    return [tree["blocks"][b] for b in range(n)] + [tree["classifier"]]

  got = per_block(updates)
  errs = [_rel_err(g, w) for g, w in zip(got, want)]
  err = _rel_err(got, want)
  vs_grad = _rel_err(got, per_block(pure_grads))
  ok = err < EQUIV_TOL and vs_grad > 1e-2 and all(e < EQUIV_TOL for e in errs)
  return {"name": "transform == scalar back-matching step", "ok": bool(ok),
          "detail": f"{model_name} width {width:g}, batch {batch}, {n + 1} blocks, float32: "
                    f"relative error {err:.2e} (worst block {max(errs):.2e}; tolerance "
                    f"{EQUIV_TOL:g}); differs from the raw gradient by {vs_grad:.2f}",
          "rel_err": err, "worst_block_rel_err": max(errs), "rel_diff_from_gradient": vs_grad}


def check_sharded_equals_single(model_name: str, width: float, steps: int = 2) -> dict:
  """The trainer's step on a mesh of every device == the same step on one device."""
  from train import pipeline, steps as steps_lib  # pylint: disable=import-outside-toplevel
  ndev = jax.device_count()
  name = "sharded step == single-device step"
  if ndev < 2:
    return {"name": name, "ok": True, "skipped": True,
            "detail": "skipped: 1 device (nothing to shard over)"}
  batch = 8 * ndev
  _, setup, state0 = _state(model_name, width, "scale_amended")
  kx, ky = jax.random.split(jax.random.key(2))
  xs = np.asarray(jax.random.normal(kx, (steps, batch, 32, 32, 3), jnp.float32))
  ys = np.asarray(jax.random.randint(ky, (steps, batch), 0, NUM_CLASSES))
  host_state = jax.device_get(state0)
  out = {}
  with jax.default_matmul_precision("highest"):
    for label, devices in (("all", jax.devices()), ("one", jax.devices()[:1])):
      mesh = pipeline.make_mesh(devices)
      step = steps_lib.make_train_step(setup, mesh)
      state = pipeline.replicate(host_state, mesh)
      sharding = NamedSharding(mesh, P(pipeline.DATA_AXIS))
      losses = []
      for i in range(steps):
        state, metrics = step(state, jax.device_put(xs[i], sharding),
                              jax.device_put(ys[i], sharding))
        losses.append(float(metrics["loss"]) / batch)
      out[label] = (jax.device_get(state["params"]), losses)
  delta = {k: jax.tree.map(lambda a, b: a - b, out[k][0], host_state["params"]) for k in out}
  err = _rel_err(delta["all"], delta["one"])
  loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(out["all"][1], out["one"][1]))
  moved = _rel_err(out["one"][0], host_state["params"])
  ok = err < SHARD_TOL and loss_err < SHARD_TOL and moved > 0
  return {"name": name, "ok": bool(ok),
          "detail": f"{model_name} width {width:g}, scale-amended, {steps} steps, global batch "
                    f"{batch} over {ndev} devices vs 1: parameter updates differ by {err:.2e}, "
                    f"losses by {loss_err:.2e} (tolerance {SHARD_TOL:g})",
          "rel_err": err, "loss_rel_err": loss_err, "devices": ndev}


# --------------------------------------------------------------------------------------------
# 4. Throughput


class _ScanBench:
  """One (model, dtype, optimizer): the trainer's ``steps``-step ``lax.scan``, compiled."""

  def __init__(self, model: str, width: float, optimizer: str, dtype: str, steps: int,
               mesh, images, labels):
    # pylint: disable-next=import-outside-toplevel
    from train import pipeline, steps as steps_lib
    self.pipeline = pipeline
    config, setup, state = _state(model, width, optimizer, dtype, steps)
    self.mesh, self.images, self.labels = mesh, images, labels
    self.state = pipeline.replicate(state, mesh)
    batches_fn = steps_lib.make_epoch_batches(config, mesh, images.shape[0])
    self.first = pipeline.replicate(np.int32(0), mesh)
    self.batches, self.key = batches_fn(self.first)
    self.steps = steps
    fn = steps_lib.make_train_steps(setup, mesh, config, steps)
    t0 = _now()
    self.fn = fn.lower(self.state, self._zeros(), images, labels, self.batches, self.key,
                       self.first).compile()
    self.compile_s = _now() - t0
    one = steps_lib.make_train_steps(setup, mesh, config, 1)
    self.flops = step_flops(one.lower(self.state, self._zeros(), images, labels, self.batches,
                                      self.key, self.first))
    self.n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    self.times: list = []

  def _zeros(self):
    return self.pipeline.replicate({k: np.float32(0) for k in ("loss", "correct", "count")},
                                   self.mesh)

  def call(self) -> float:
    sums = self._zeros()
    jax.block_until_ready(sums)
    t0 = _now()
    self.state, sums = self.fn(self.state, sums, self.images, self.labels, self.batches,
                               self.key, self.first)
    jax.block_until_ready((self.state, sums))
    dt = _now() - t0
    loss = float(sums["loss"] / sums["count"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"non-finite training loss {loss}")
    return dt


def bench_throughput(model: str, width: float, dtype: str, steps: int, reps: int,
                     mm_rate: float) -> dict:
  """SGD and scale-amended SGD interleaved on one device: images/s, utilization, ratio."""
  from train import pipeline  # pylint: disable=import-outside-toplevel
  mesh = pipeline.make_mesh(jax.devices()[:1])  # per-device figures
  n = steps * BATCH
  kx, ky = jax.random.split(jax.random.key(3))
  images = jax.random.randint(kx, (n, 32, 32, 3), 0, 256, jnp.int32).astype(jnp.uint8)
  labels = jax.random.randint(ky, (n,), 0, NUM_CLASSES, jnp.int32)
  images, labels = pipeline.replicate((np.asarray(images), np.asarray(labels)), mesh)
  benches = {o: _ScanBench(model, width, o, dtype, steps, mesh, images, labels)
             for o in ("sgd", "scale_amended")}
  for b in benches.values():
    b.call()  # warm-up
  for r in range(reps):
    for o in (("sgd", "scale_amended") if r % 2 == 0 else ("scale_amended", "sgd")):
      benches[o].times.append(benches[o].call())
  rows = {}
  for o, b in benches.items():
    t = _median(b.times) / steps
    rows[o] = {"step_ms": 1e3 * t, "steps_per_s": 1.0 / t, "images_per_s": BATCH / t,
               "gflop_per_step": b.flops / 1e9,
               "achieved_tflop_per_s": b.flops / t / 1e12,
               "fraction_of_matmul": b.flops / t / mm_rate if mm_rate > 0 else float("nan"),
               "compile_s": b.compile_s, "params": b.n_params,
               "step_ms_samples": [1e3 * x / steps for x in b.times]}
  ratios = [a / s for a, s in zip(benches["scale_amended"].times, benches["sgd"].times)]
  return {"model": model, "width": width, "dtype": dtype, "steps_per_call": steps,
          "reps": reps, "optimizers": rows, "ratio_scale_amended_to_sgd": _median(ratios),
          "ratio_min_max": [float(min(ratios)), float(max(ratios))]}


# --------------------------------------------------------------------------------------------
# 5. Training run


def check_data(data_dir: str, allow_subset: bool) -> dict:
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  ds = data_lib.load_cifar("cifar10", data_dir, allow_subset=allow_subset)
  return {"source": ds.source, "num_train": int(len(ds.train_labels)),
          "num_test": int(len(ds.test_labels)), "checksum": ds.checksum}


def training_run(data_dir: str, allow_subset: bool, model: str, width: float, epochs: int,
                 dtype: str, train_subset: Optional[int] = None,
                 test_subset: Optional[int] = None) -> dict:
  from train import cifar, config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.Config(dataset="cifar10", model=model, width=width, epochs=epochs,
                             batch_size=BATCH, optimizer="scale_amended", compute_dtype=dtype,
                             data_dir=data_dir, allow_subset=allow_subset,
                             train_subset=train_subset, test_subset=test_subset)
  with tempfile.TemporaryDirectory(prefix="accelerator_check_") as workdir:
    t0 = _now()
    history = cifar.train_and_evaluate(config, workdir, progress=False)
    wall = _now() - t0
  return {"model": model, "width": width, "epochs": epochs, "dtype": dtype,
          "optimizer": "scale_amended", "wall_s": wall, "train_subset": train_subset,
          "test_subset": test_subset,
          "seconds_per_epoch": [h["seconds"] for h in history],
          "images_per_s": [h["images_per_sec"] for h in history],
          "test_acc": [h["test_acc"] for h in history],
          "train_loss": [h["train_loss"] for h in history]}


# --------------------------------------------------------------------------------------------
# Report


def _fmt_rate(x: float) -> str:
  return "n/a" if not math.isfinite(x) else f"{x / 1e12:.2f} TFLOP/s" if x >= 1e11 else (
      f"{x / 1e9:.1f} GFLOP/s")


def markdown(report: dict) -> str:
  d = report["devices"]
  quick = "**Quick CPU smoke run: tiny width, figures mean nothing.** " if report["quick"] else ""
  lines = [f"# Accelerator check: {d['platform']} ({', '.join(d['kinds'])})", "",
           f"{quick}{d['device_count']} device(s) on {d['process_count']} process(es); "
           f"memory per device {d['memory_gib'] or 'n/a'} GiB; "
           + ", ".join(f"{k} {v}" for k, v in d["versions"].items())
           + f"; {d['host']}; XLA_FLAGS={d['xla_flags']!r}. Total "
           f"{report['total_s']:.0f} s ("
           + ", ".join(f"{k} {v:.0f} s" for k, v in report["section_s"].items())
           + f"; process CPU time {sum(report.get('section_cpu_s', {}).values()):.0f} s; load "
           f"average {report.get('load', 'n/a')}).", ""]
  lines += ["## Matmul rate", "", "| dtype | n | time per matmul | rate (median) | best |",
            "|---|---|---|---|---|"]
  for m in report["matmul"].values():
    lines.append(f"| {m['dtype']} | {m['n']} | {1e3 * m['seconds_per_matmul']:.3f} ms | "
                 f"{_fmt_rate(m['flops_per_s'])} | {_fmt_rate(m['flops_per_s_max'])} |")
  lines += ["", "## Correctness on the device", "", "| check | result | detail |",
            "|---|---|---|"]
  for c in report["checks"]:
    verdict = "skipped" if c.get("skipped") else "pass" if c["ok"] else "**FAIL**"
    lines.append(f"| {c['name']} | {verdict} | {c['detail']} |")
  lines += ["", "## Training throughput (one device, the trainer's step chunk as one lax.scan, "
            f"batch {BATCH}, synthetic uint8 data)", "",
            "| model | width | dtype | optimizer | step ms | images/s | GFLOP/step (XLA) | "
            "achieved | fraction of matmul rate | compile s"
            + (" (persistent cache on: a rerun hits it)" if report.get("compilation_cache")
               else "") + " |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for t in report["throughput"]:
    if "skipped" in t:
      lines.append(f"| {t['model']} | {t['width']:g} | {t['dtype']} | - | {t['skipped']} "
                   "| | | | | |")
      continue
    for o, r in t["optimizers"].items():
      lines.append(
          f"| {t['model']} | {t['width']:g} | {t['dtype']} | {o} | {r['step_ms']:.2f} | "
          f"{r['images_per_s']:.0f} | {r['gflop_per_step']:.1f} | "
          f"{_fmt_rate(r['achieved_tflop_per_s'] * 1e12)} | "
          f"{100 * r['fraction_of_matmul']:.1f} % | {r['compile_s']:.1f} |")
  lines += ["", "Step-time ratio scale-amended / SGD (interleaved calls, median (min-max)):", ""]
  for t in report["throughput"]:
    if "skipped" not in t:
      lo, hi = t["ratio_min_max"]
      lines.append(f"- {t['model']} {t['dtype']}: {t['ratio_scale_amended_to_sgd']:.3f} "
                   f"({lo:.3f}-{hi:.3f}), {t['reps']} reps of {t['steps_per_call']} steps")
  tr = report.get("training")
  lines += ["", "## Training run on CIFAR-10", ""]
  if tr is None:
    lines.append("Not run (no `--data-dir`).")
  else:
    data = report["data"]
    n_train = min(data["num_train"], tr["train_subset"] or data["num_train"])
    n_test = min(data["num_test"], tr["test_subset"] or data["num_test"])
    lines += [f"{tr['model']} width {tr['width']:g}, {tr['dtype']}, scale-amended SGD, batch "
              f"{BATCH}, {tr['epochs']} epoch(s) on {n_train} train / {n_test} test images "
              f"of {data['source']}; wall {tr['wall_s']:.1f} s including data loading and "
              "compilation.", "",
              "| epoch | seconds | images/s | train loss | test acc |", "|---|---|---|---|---|"]
    for i, (s, ips, loss, acc) in enumerate(zip(tr["seconds_per_epoch"], tr["images_per_s"],
                                                tr["train_loss"], tr["test_acc"])):
      lines.append(f"| {i + 1} | {s:.2f} | {ips:.0f} | {loss:.4f} | {100 * acc:.2f} % |")
  lines += ["", f"Verdict: {'all checks passed' if report['ok'] else 'A CHECK FAILED'}.", ""]
  return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
  from train import cli  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke run: VGG11 only at width 1/16, 2 scanned steps, 1 rep, one "
                      "training epoch on at most 256 train / 200 test images")
  p.add_argument("--models", default=None, help="default vgg11,vgg16; quick vgg11")
  p.add_argument("--width", type=float, default=None, help="throughput width; default 1, "
                                                           "quick 0.0625")
  p.add_argument("--dtypes", default="float32,bfloat16",
                 help=f"comma-separated compute dtypes of the throughput section "
                      f"({', '.join(DTYPES)})")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps per scanned call; default 20, quick 2")
  p.add_argument("--reps", type=int, default=None, help="timed calls per optimizer (after "
                                                        "a warm-up call); default 5, quick 1")
  p.add_argument("--matmul-n", type=int, default=None,
                 help="default 8192 on GPU/TPU, 2048 on CPU, quick 256")
  p.add_argument("--check-width", type=float, default=None,
                 help="VGG11 width of the correctness checks; default 0.25, quick 0.0625")
  p.add_argument("--data-dir", default=None,
                 help="CIFAR-10 for the training run (as train/cifar.py --data-dir; 'sample' "
                      "for the shipped sample); none: no training run")
  p.add_argument("--allow-subset", action="store_true", help="as train/cifar.py")
  p.add_argument("--train-model", default="vgg11", help="VGG-BN of the training run")
  p.add_argument("--train-width", type=float, default=None, help="default 1, quick 0.0625")
  p.add_argument("--train-epochs", type=int, default=None, help="default 2, quick 1")
  p.add_argument("--train-dtype", choices=DTYPES, default="float32",
                 help="compute dtype of the training run")
  p.add_argument("--train-subset", type=int, default=None,
                 help="train on the first N images only (as train/cifar.py); quick 256")
  p.add_argument("--budget-s", type=float, default=None,
                 help="skip the remaining throughput configurations once this many seconds "
                      "have passed (the training run still runs); default 420, quick: none")
  p.add_argument("--compilation-cache-dir", default=None,
                 help="JAX's persistent compilation cache, as train/cifar.py's (default: the "
                      "trainer's, $JAX_COMPILATION_CACHE_DIR or ~/.cache/optax_bm/jax): a "
                      "rerun compiles nothing again")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="compile everything afresh (compile times as on a fresh machine)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                 help="directory for accelerator_<platform>.md and .json")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, every one checked here (exit 2, one line), before any device work."""
  p = make_parser()
  args = p.parse_args(argv)
  q = args.quick
  defaults = dict(models="vgg11" if q else "vgg11,vgg16", width=0.0625 if q else 1.0,
                  steps=2 if q else 20, reps=1 if q else 5, check_width=0.0625 if q else 0.25,
                  train_width=0.0625 if q else 1.0, train_epochs=1 if q else 2,
                  train_subset=256 if q else None, budget_s=math.inf if q else 420.0)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("width", "check_width", "train_width", "budget_s"):
    value = getattr(args, name)
    if not (value > 0 and (math.isfinite(value) or name == "budget_s")):
      p.error(f"--{name.replace('_', '-')} must be a positive number (got {value:g})")
  for name in ("steps", "reps", "train_epochs", "matmul_n", "train_subset"):
    value = getattr(args, name)
    if value is not None and value < 1:
      p.error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
  dtypes = [d for d in args.dtypes.split(",") if d]
  bad = [d for d in dtypes if d not in DTYPES]
  if bad:
    p.error(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
  args.dtypes = dtypes
  from train import models  # pylint: disable=import-outside-toplevel
  for m in [m for m in args.models.split(",") if m] + [args.train_model]:
    if m not in models.MODELS:
      p.error(f"unknown model {m!r}; choose from {', '.join(models.MODELS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  from train import cli  # pylint: disable=import-outside-toplevel
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  cli.set_cpu_xla_flags()  # the trainer's flags, before the first computation
  cache = None
  if not args.no_compilation_cache:
    cache = cli.enable_compilation_cache(args.compilation_cache_dir
                                         or cli.default_compilation_cache_dir())
  t_start = _now()
  report: dict = {"quick": args.quick, "compilation_cache": cache is not None,
                  "args": {k: v for k, v in vars(args).items()
                           if k not in ("out", "data_dir", "compilation_cache_dir")}}

  report["section_s"] = sections = {}
  report["section_cpu_s"] = cpu_sections = {}  # process CPU time: what the load cannot change
  t_section = [_now(), time.process_time()]

  def say(text: str, section: Optional[str] = None) -> None:
    if section is not None:
      sections[section] = round(sections.get(section, 0.0) + _now() - t_section[0], 2)
      cpu_sections[section] = round(cpu_sections.get(section, 0.0) + time.process_time()
                                    - t_section[1], 2)
      t_section[:] = [_now(), time.process_time()]
    print(f"[{_now() - t_start:6.1f} s] {text}", flush=True)

  if args.data_dir is not None:  # before anything else: a bad data set is one line, now
    try:
      report["data"] = check_data(args.data_dir, args.allow_subset)
    except data_lib.DataError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    report["data"]["dir"] = data_lib.portable_path(args.data_dir) if args.data_dir != (
        "sample") else "sample"
    say(f"data: {report['data']['source']}", "data")

  report["devices"] = d = devices_info()
  say(f"devices: {d['device_count']} x {', '.join(d['kinds'])} ({d['platform']}); "
      f"jax {d['versions']['jax']}, jaxlib {d['versions']['jaxlib']}", "devices")
  accel = d["platform"] != "cpu"
  n = args.matmul_n or (256 if args.quick else 8192 if accel else 2048)
  report["matmul"] = {}
  for dtype in DTYPES:
    m = report["matmul"][dtype] = matmul_rate(n, dtype, 0.05 if args.quick else 0.3,
                                              3 if args.quick else 5)
    say(f"matmul {dtype} {n}x{n}: {_fmt_rate(m['flops_per_s'])}", "matmul")

  report["checks"] = []
  for check in (lambda: check_transform_equals_backmatching("vgg11", args.check_width, 16),
                lambda: check_sharded_equals_single("vgg11", args.check_width)):
    c = check()
    report["checks"].append(c)
    say(f"check {c['name']}: {'skipped' if c.get('skipped') else 'pass' if c['ok'] else 'FAIL'}"
        f" ({c['detail']})", "checks")

  report["throughput"] = []
  reserve = 0.0 if args.data_dir is None else (20.0 if args.quick else 120.0)
  for model in [m for m in args.models.split(",") if m]:
    for dtype in args.dtypes:
      if _now() - t_start > args.budget_s - reserve:
        report["throughput"].append({"model": model, "width": args.width, "dtype": dtype,
                                     "skipped": f"skipped: past --budget-s {args.budget_s:g}"})
        say(f"throughput {model} {dtype}: skipped (time budget)", "throughput")
        continue
      t = bench_throughput(model, args.width, dtype, args.steps, args.reps,
                           report["matmul"][dtype]["flops_per_s"])
      report["throughput"].append(t)
      sa = t["optimizers"]["scale_amended"]
      say(f"throughput {model} w{args.width:g} {dtype}: {sa['images_per_s']:.0f} images/s "
          f"(scale-amended), {100 * sa['fraction_of_matmul']:.1f} % of the matmul rate; "
          f"scale-amended/SGD {t['ratio_scale_amended_to_sgd']:.3f}", "throughput")

  report["training"] = None
  if args.data_dir is not None:
    report["training"] = tr = training_run(
        args.data_dir, args.allow_subset, args.train_model, args.train_width, args.train_epochs,
        args.train_dtype, args.train_subset, 200 if args.quick else None)
    say(f"training run: {', '.join(f'{s:.1f}' for s in tr['seconds_per_epoch'])} s per epoch",
        "training")

  report["ok"] = all(c["ok"] for c in report["checks"])
  report["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
  report["total_s"] = _now() - t_start
  text = markdown(report)
  out = pathlib.Path(args.out)
  stem = f"accelerator_{d['platform']}"
  _atomic_write(out / f"{stem}.json",
                json.dumps(_json_safe(report), indent=2, default=str, allow_nan=False) + "\n")
  _atomic_write(out / f"{stem}.md", text)
  print("\n" + text)
  shown = data_lib.portable_path(out)
  print(f"wrote {shown}/{stem}.md and {stem}.json ({report['total_s']:.0f} s)")
  if not report["ok"]:
    print("error: a correctness check failed (see the table above)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
