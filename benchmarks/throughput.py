"""Training throughput, the on-device data path, and utilization of the machine.

Measured in one run, interleaved (order rotated every repetition), batch on the device:

* **step**: the whole training step (the trainer's own ``train.steps.train_step``) on an
  already-normalized batch: images/s;
* **data path**: the trainer's on-device input pipeline for one batch, ``augment`` (random
  crop + flip) then ``normalize`` from ``train/pipeline.py``; also with the gather of the batch
  from a 50 000-image ``uint8`` set (what the trainer's epoch scan does); images/s and share
  of the step (target ≤ 5 %);
* **fused step**: data path + step in one jitted function, as in the trainer's scan body;
  its excess over the step is the data path's in-step cost;
* **matmul**: a large ``jnp.dot`` (f32 N×N, or bf16 on an accelerator), the machine's own
  dense FLOP/s, against which the step's achieved FLOP/s gives the utilization.

The step's FLOPs come from XLA's cost analysis of the compiled step
(``jitted.lower(...).compile().cost_analysis()["flops"]``); a count from the model's jaxpr
(2 FLOPs per multiply-accumulate of every conv/dense, ×3 for forward, input and weight
gradients, less the first layer's unneeded input gradient) is printed next to it.

``--profile`` (default on, off with ``--quick``) traces one step with ``jax.profiler`` and
prints where its time goes: op time by kind (forward, input-gradient and weight-gradient
convolutions, matrix products, max-pool, BatchNorm reductions, transposed copies, elementwise;
each HLO instruction classified from the compiled module), the ops that take the most time,
and the share spent in convolutions that XLA:CPU could not hand to a library
(operand-swapped convolutions on 2×2 maps; none since ``train/small_map_conv.py``, see
``--plain-conv``).

Like the trainer, the script turns off XLA:CPU's concurrency-optimized scheduler
(``train.cli.CPU_XLA_FLAGS``); ``--xla-default-scheduler`` keeps it.

bf16: ``--dtype auto`` computes in bf16 (parameters f32) on a GPU/TPU and f32 on a CPU; that
path is written for accelerators but **untested on GPU** (none was available).

Usage::

  python benchmarks/throughput.py              # VGG11 + VGG16, full width
  python benchmarks/throughput.py --quick      # CI scale: VGG11 at width 1/8, 3 reps, no profile
  python benchmarks/throughput.py --plain-conv # + each model without train/small_map_conv.py
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a fresh checkout
  sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import optimizer_overhead as oo
from train import pipeline
from train import models

DATASET_SIZE = 50_000
AUG_TARGET = 0.05

def counted_train_flops(model_name: str, width: float, batch: int) -> float:
  """2 · MACs of every conv/dense in the forward pass × 3, less the first layer's input grad."""
  model = models.vgg(model_name, oo.NUM_CLASSES, width, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def fwd(state, x):
    return nnx.merge(graphdef, state)(x)

  jaxpr = jax.make_jaxpr(fwd)(state, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32))
  macs = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
        o = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        macs.append(math.prod(out) * math.prod(rhs) // o)
      elif eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        macs.append(math.prod(eqn.outvars[0].aval.shape) *
                    math.prod(lhs[d] for d in lhs_contract))
      for sub in _sub_jaxprs(eqn):
        walk(sub)

  walk(jaxpr.jaxpr)
  if not macs:
    return float("nan")
  return 2.0 * (3 * sum(macs) - macs[0])


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x


def swapped_conv_names(compiled) -> set:
  names = set()
  for line in oo.entry_text(compiled.as_text()).splitlines():
    if " convolution(" in line and "rhs_reversal" in line:
      names.add(line.split("=", 1)[0].strip().lstrip("%").split()[-1])
  return names


_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")


def classify_ops(hlo_text: str, kernel_shapes) -> dict:
  """HLO instruction name -> (kind, output shape) for a profile's time breakdown.

  A fusion is classified by what its called computation contains (a convolution, a dot, a
  window reduction, ...). A convolution whose output holds a kernel's dimensions (in any
  order: ``kernel_shapes`` are the model's conv kernel shapes) is a weight gradient; else the
  JAX op name in its metadata tells the backward pass (``transpose(jvp())``: an input
  gradient) from the forward one.
  """
  kernels = {tuple(sorted(s)) for s in kernel_shapes}
  comps, cur = collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    h = _HEADER.match(line)
    if h:
      cur = h.group(1)
      continue
    m = _INSTR.match(line)
    if m and cur:
      calls = re.search(r"calls=%([\w.\-]+)", line)
      op_name = re.search(r'op_name="([^"]*)"', line)
      comps[cur].append((m.group(1), m.group(2).lstrip("(").split("{")[0], m.group(3),
                         calls.group(1) if calls else None,
                         op_name.group(1) if op_name else "", line.lstrip().startswith("ROOT")))
  op_names = {name: op_name for instrs in comps.values() for name, _, _, _, op_name, _ in instrs}

  def inner(comp, depth=0):  # every (op, shape, op_name, is_root) inside, fusions flattened
    out = []
    for _, shape, op, calls, op_name, root in comps.get(comp, ()):
      out.append((op, shape, op_name, root))
      if calls and depth < 4:
        out += inner(calls, depth + 1)
    return out

  def category(name, op, shape, calls):
    body = [(op, shape, op_names[name], True)] + (inner(calls) if calls else [])
    ops = {o for o, *_ in body}
    conv = next((b for b in body if b[0] == "convolution"), None)
    if conv:
      _, cshape, cname, _ = conv
      dims = tuple(sorted(int(d) for d in re.findall(r"\d+", cshape.split("[", 1)[-1])))
      if dims in kernels:
        return "conv, weight gradient", cshape
      if not cname:
        return "conv, no op name", cshape
      return ("conv, input gradient" if "transpose(" in cname else "conv, forward"), cshape
    if "dot" in ops:
      return "matmul (dense layers, small-map convs)", shape
    if ops & {"reduce-window", "select-and-scatter"}:
      return "max-pool, forward and backward", shape
    roots = [o for o, _, _, r in body[1:] if r] or [op]
    if roots[-1] in ("copy", "transpose") and "transpose" in ops:
      return "transposed copy for a conv (+ fused elementwise)", shape
    if "reduce" in ops:
      return "reduction: BN statistics, norms (+ fused elementwise)", shape
    return "elementwise: BN apply, ReLU, update; copies", shape

  names = {}
  for comp, instrs in comps.items():
    for name, shape, op, calls, _, _ in instrs:
      if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
        continue
      names[name] = category(name, op, shape, calls)
  return names


def profile_step(fn, state, images, labels, swapped: set, top: int = 12):
  """Traces one call; returns (state, wall seconds, [(ms, count, name)], ms in swapped convs,
  {name: ms} of every traced op)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      state, metrics = fn(state, images, labels)
      jax.block_until_ready((state, metrics))
      wall = time.perf_counter() - t0
    paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      return state, wall, [], float("nan"), {}
    with gzip.open(paths[0]) as f:
      events = json.load(f).get("traceEvents", [])
  total, count = collections.defaultdict(float), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if (e.get("ph") != "X" or "::" in name or name.startswith("$")
        or name.startswith("PjitFunction(")):
      continue  # runtime wrappers, Python frames, the whole call
    total[name] += e.get("dur", 0.0) / 1e3
    count[name] += 1
  rows = sorted(((ms, count[n], n) for n, ms in total.items()), reverse=True)[:top]
  return state, wall, rows, sum(total.get(n, 0.0) for n in swapped), dict(total)


def bench_model(model_name: str, width: float, optimizer: str, dtype, reps: int,
                sample_s: float, matmul_n: int, profile: bool, variant: str = "",
                small_map_conv: Optional[bool] = None) -> dict:
  images_u8_all = jax.random.randint(jax.random.key(2), (DATASET_SIZE, 32, 32, 3), 0, 256,
                                     jnp.int32).astype(jnp.uint8)
  labels_all = jax.random.randint(jax.random.key(3), (DATASET_SIZE,), 0, oo.NUM_CLASSES,
                                  jnp.int32)
  images_u8, labels = images_u8_all[:oo.BATCH], labels_all[:oo.BATCH]
  x = pipeline.normalize(images_u8, "cifar10", dtype)
  aug_key = jax.random.key(4)

  step, state, source = oo.train_state_and_step(model_name, width, optimizer, dtype,
                                                 small_map_conv)
  _, state2, _ = oo.train_state_and_step(model_name, width, optimizer, dtype, small_map_conv)

  def data_path(i, images):
    out = pipeline.normalize(pipeline.augment(jax.random.fold_in(aug_key, i), images),
                             "cifar10", dtype)
    return i + 1, out

  def gather_data_path(i, images, labels):
    idx = jax.random.randint(jax.random.fold_in(aug_key, -i), (oo.BATCH,), 0, DATASET_SIZE)
    batch = jnp.take(images, idx, axis=0)
    out = pipeline.normalize(pipeline.augment(jax.random.fold_in(aug_key, i), batch),
                             "cifar10", dtype)
    return i + 1, out, jnp.take(labels, idx, axis=0)

  def fused(state, i, images, labels):
    i, xs = data_path(i, images)
    state, metrics = step(state, xs, labels)
    return state, i, metrics

  mm_dtype = dtype
  a = jax.random.normal(jax.random.key(5), (matmul_n, matmul_n), jnp.float32).astype(mm_dtype)
  b = jax.random.normal(jax.random.key(6), (matmul_n, matmul_n), jnp.float32).astype(mm_dtype)

  step_fn = jax.jit(step, donate_argnums=(0,))
  fused_fn = jax.jit(fused, donate_argnums=(0,))
  data_fn = jax.jit(data_path)
  gather_fn = jax.jit(gather_data_path)
  mm_fn = jax.jit(lambda a, b: (jnp.dot(a, b),))
  i0 = jnp.zeros((), jnp.int32)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, x, labels).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  xla_flops = float((cost or {}).get("flops", float("nan")))
  param_bytes = sum(int(v.nbytes) for v in jax.tree.leaves(state["params"]))
  kernel_shapes = [v.shape for v in jax.tree.leaves(state["params"]) if v.ndim == 4]
  hlo = oo.hlo_stats(compiled, param_bytes)
  swapped = swapped_conv_names(compiled)
  mm_cost = mm_fn.lower(a, b).compile().cost_analysis()
  if isinstance(mm_cost, (list, tuple)):
    mm_cost = mm_cost[0] if mm_cost else {}
  mm_flops = float((mm_cost or {}).get("flops", 2.0 * matmul_n ** 3)) or 2.0 * matmul_n ** 3

  chains = {
      "step": oo.Chain(step_fn, (state,), (x, labels), 1),
      "fused": oo.Chain(fused_fn, (state2, i0), (images_u8, labels), 2),
      "data": oo.Chain(data_fn, (i0,), (images_u8,), 1),
      "gather": oo.Chain(gather_fn, (i0,), (images_u8_all, labels_all), 1),
      "matmul": oo.Chain(mm_fn, (), (a, b), 0),
  }
  for name, c in chains.items():
    c.calibrate(sample_s, max_k=50 if name in ("step", "fused") else 1000)
  times = oo.interleaved(chains, reps)

  prof = None
  if profile:
    st, wall, rows, swapped_ms, op_ms = profile_step(step_fn, chains["step"].carry[0], x,
                                                     labels, swapped)
    chains["step"].carry = (st,)
    kinds = classify_ops(compiled.as_text(), kernel_shapes)
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in op_ms.items():
      k = kinds.get(name, ("other (not an HLO instruction name)", ""))[0]
      by_kind[k][0] += ms
      by_kind[k][1] += 1
    rows = [(ms, n, name, kinds.get(name, ("-", ""))) for ms, n, name in rows]
    prof = {"wall": wall, "rows": rows,
            "swapped_ms": swapped_ms, "n_swapped": len(swapped),
            "by_kind": sorted(((v[0], v[1], k) for k, v in by_kind.items()), reverse=True)}

  q = {n: oo.quantiles(t) for n, t in times.items()}
  step_t, mm_t = np.asarray(times["step"]), np.asarray(times["matmul"])
  per_rep_util = (xla_flops / step_t) / (mm_flops / mm_t)
  share = oo.quantiles(np.asarray(times["data"]) / step_t)
  share_gather = oo.quantiles(np.asarray(times["gather"]) / step_t)
  in_step = oo.quantiles((np.asarray(times["fused"]) - step_t) / step_t)
  return {
      "model": model_name + variant, "width": width, "dtype": jnp.dtype(dtype).name,
      "source": source,
      "optimizer": optimizer, "q": q, "k": {n: c.k for n, c in chains.items()},
      "compile_s": compile_s, "xla_flops": xla_flops,
      "counted_flops": counted_train_flops(model_name, width, oo.BATCH),
      "mm_flops": mm_flops, "matmul_n": matmul_n, "util": oo.quantiles(per_rep_util),
      "share": share, "share_gather": share_gather, "in_step": in_step, "hlo": hlo,
      "profile": prof,
      "retraces": sum((oo.cache_size(f) or 1) - 1 for f in (step_fn, fused_fn, data_fn, gather_fn)),
  }


def print_tables(results: list, reps: int) -> None:
  r0 = results[0]
  print(f"\n### Training step throughput and utilization, batch {oo.BATCH}, optimizer "
        f"{oo.LABELS[r0['optimizer']]}, {reps} interleaved reps\n")
  print("| model | width | dtype | step ms, median [IQR] | images/s | XLA GFLOP/step | "
        "counted GFLOP/step | achieved GFLOP/s | matmul GFLOP/s (same run) | utilization |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    st, mm = r["q"]["step"]["median"], r["q"]["matmul"]["median"]
    wl = "1 (full)" if r["width"] == 1 else f"{r['width']:g}"
    print(f"| {r['model']} | {wl} | {r['dtype']} | {oo.fmt_ms(r['q']['step'])} | "
          f"{oo.BATCH / st:.1f} | {r['xla_flops'] / 1e9:.1f} | {r['counted_flops'] / 1e9:.1f} | "
          f"{r['xla_flops'] / st / 1e9:.1f} | {r['mm_flops'] / mm / 1e9:.1f} "
          f"({r['matmul_n']}² {r['dtype']}) | {100 * r['util']['median']:.1f} % "
          f"[{100 * r['util']['q1']:.1f}-{100 * r['util']['q3']:.1f}] |")
  if any(r["model"].endswith("*") for r in results):
    print("\n\\* `small_map_conv=False`: every convolution through `lax.conv_general_dilated`, "
          "i.e. the trainer's model before `train/small_map_conv.py` (for comparison; the "
          "trainer uses the small-map path on the CPU backend).")
  print("\nutilization = (XLA cost-analysis FLOPs of the step / step time) / (matmul FLOPs / "
        "matmul time), per repetition, median [IQR].")
  print(f"\n### On-device data path, batch {oo.BATCH} (target: ≤ {100 * AUG_TARGET:g} % of the "
        "step)\n")
  print("| model (step) | data path | ms, median [IQR] | images/s | share of step, median "
        "(min-max) | verdict |")
  print("|---|---|---|---|---|---|")
  for r in results:
    for key, label, sh in (("data", "augment + normalize", r["share"]),
                           ("gather", "gather from 50k uint8 + augment + normalize",
                            r["share_gather"])):
      qd = r["q"][key]
      ok = "met" if sh["median"] <= AUG_TARGET else "MISSED"
      print(f"| {r['model']} w{r['width']:g} | {label} | {oo.fmt_ms(qd)} | "
            f"{oo.BATCH / qd['median']:.0f} | {100 * sh['median']:.3f} % "
            f"({100 * sh['min']:.3f}-{100 * sh['max']:.3f}) | {ok} |")
    ins = r["in_step"]
    print(f"| {r['model']} w{r['width']:g} | in the fused step (fused − step) / step | "
          f"{oo.fmt_ms(r['q']['fused'])} (fused) | - | {100 * ins['median']:+.2f} % "
          f"({100 * ins['min']:+.2f}-{100 * ins['max']:+.2f}) | noise-limited |")
  for r in results:
    h = r["hlo"]
    print(f"\n{r['model']}: step = {r['source']}; compile {r['compile_s']:.1f} s; retraces "
          f"after warm-up: {r['retraces']}; entry fusions {h['fusions']} "
          f"({h['library_fusions']} YNNPACK/library); top-level convolutions {h['convolutions']} "
          f"({h['swapped_convolutions']} operand-swapped, XLA's generic loop emitter); "
          f"k = {r['k']}")
    p = r["profile"]
    if p:
      print(f"\nprofile of one {r['model']} step ({p['wall'] * 1e3:.0f} ms wall, traced): "
            f"{p['n_swapped']} operand-swapped convolutions took {p['swapped_ms']:.0f} ms "
            f"= {100 * p['swapped_ms'] / max(p['wall'] * 1e3, 1e-9):.0f} % of the step")
      total = sum(ms for ms, _, _ in p["by_kind"])
      print(f"\ntraced op time by kind ({total:.0f} ms in all; ops may overlap, so this can "
            "exceed the wall time):\n")
      print("| kind of op | ms | share of op time | ops |\n|---|---|---|---|")
      for ms, n, k in p["by_kind"]:
        print(f"| {k} | {ms:.1f} | {100 * ms / max(total, 1e-9):.1f} % | {n} |")
      print("\n| op (HLO instruction) | kind | output | ms | calls |\n|---|---|---|---|---|")
      for ms, n, name, (kind, shape) in p["rows"]:
        print(f"| {name[:50]} | {kind} | {shape} | {ms:.1f} | {n} |")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="CI scale: VGG11 only, width 1/8 unless --width, 3 reps, no profile")
  p.add_argument("--models", default=None, help="default vgg11,vgg16; quick vgg11")
  p.add_argument("--width", type=float, default=None, help="default 1, quick 0.125")
  p.add_argument("--optimizer", choices=oo.OPTIMIZERS, default="scale_amended")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="compute dtype; auto: bf16 on GPU/TPU (untested on GPU), f32 on CPU")
  p.add_argument("--reps", type=int, default=None, help="default 5, quick 3")
  p.add_argument("--sample-seconds", type=float, default=None, help="default 0.5, quick 0.1")
  p.add_argument("--matmul-n", type=int, default=2048)
  p.add_argument("--plain-conv", action="store_true",
                 help="also measure each model with small_map_conv=False (every convolution "
                      "through lax.conv_general_dilated: the model before train/small_map_conv.py)")
  p.add_argument("--xla-default-scheduler", action="store_true",
                 help="keep XLA:CPU's concurrency-optimized scheduler (the trainer turns it off: "
                      "train.cli.CPU_XLA_FLAGS)")
  p.add_argument("--profile", dest="profile", action="store_true", default=None)
  p.add_argument("--no-profile", dest="profile", action="store_false")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not args.xla_default_scheduler:
    from train import cli  # pylint: disable=import-outside-toplevel
    cli.set_cpu_xla_flags()  # the trainer's flags, set before the first computation
  width = args.width if args.width is not None else (0.125 if args.quick else 1.0)
  reps = args.reps or (3 if args.quick else 5)
  sample_s = args.sample_seconds if args.sample_seconds is not None else (0.1 if args.quick else 0.5)
  profile = (not args.quick) if args.profile is None else args.profile
  accelerator = jax.default_backend() in ("gpu", "tpu")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
      args.dtype, jnp.bfloat16 if accelerator else jnp.float32)
  t_start = time.perf_counter()
  print(f"# throughput{' --quick' if args.quick else ''}")
  print(oo.machine_line())
  if dtype == jnp.bfloat16:
    print("note: bf16 compute path (parameters f32); written for GPU but untested on GPU"
          + ("" if accelerator else "; these are CPU figures, not representative of a GPU"))
  print(oo.load_line("at start"))
  results = []
  models_arg = args.models if args.models is not None else ("vgg11" if args.quick else "vgg11,vgg16")
  for m in [m for m in models_arg.split(",") if m]:
    results.append(bench_model(m, width, args.optimizer, dtype, reps, sample_s, args.matmul_n,
                               profile))
    print(oo.load_line(f"after {m}"))
    if args.plain_conv:
      results.append(bench_model(m, width, args.optimizer, dtype, reps, sample_s,
                                 args.matmul_n, profile, variant=" plain lax.conv*",
                                 small_map_conv=False))
      print(oo.load_line(f"after {m} plain lax.conv"))
  print_tables(results, reps)
  print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
