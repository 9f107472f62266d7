"""Where a training step's time goes, the trainer's against PyTorch's, by kind of op.

Issue 21 asks, where the trainer's step cannot match PyTorch's on the same CPU, for the
profile that shows what bounds it. For each ``--models`` at each ``--widths`` this traces
``--steps`` training steps of each side after a warm-up, in one process, and sums the op time
per kind:

* **trainer**: ``train.steps.train_step`` (SGD), traced with ``jax.profiler``, every HLO
  instruction classified from the compiled module (``benchmarks/throughput.py``'s
  ``classify_ops``: forward, input-gradient and weight-gradient convolutions, BatchNorm
  statistics, elementwise, transposed copies, pooling, matmuls);
* **PyTorch**: the same network and SGD as ``benchmarks/peer_pytorch.py``, traced with
  ``torch.profiler``; its ATen kernels classified by name the same way (``mkldnn``/oneDNN
  convolutions and ``convolution_backward``, batch norm and its backward, ReLU and
  ``threshold_backward``, max-pool and its backward, the optimizer's ``_foreach`` ops, ...).

Both tables list milliseconds per step by kind, the number of ops per step, and the wall
time of a step; the gap between wall time and op time is the runtime's own (dispatch, thread
hand-offs). Needs torch (``pip install -e '.[peer]'``).

Usage::

  python benchmarks/peer_profile.py --models vgg11 --widths 1/8,1
"""

from __future__ import annotations

import argparse
import collections
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

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "peer_profile.md"

# PyTorch's CPU kernels (the innermost ATen op of each call) by the trainer's kinds of op.
TORCH_KINDS = (
    ("convolution_backward", "conv, backward (input and weight gradients)"),
    ("conv", "conv, forward"),
    ("native_batch_norm_backward", "BatchNorm backward"),
    ("batch_norm", "BatchNorm forward"),
    ("max_pool", "max-pool, forward and backward"),
    ("threshold_backward", "ReLU, forward and backward"),
    ("relu", "ReLU, forward and backward"),
    ("addmm", "matmul (dense layer)"),
    ("mm", "matmul (dense layer)"),
    ("_foreach", "optimizer update"),
    ("softmax", "loss"),
    ("nll_loss", "loss"),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vgg11", help="comma-separated VGGs")
  p.add_argument("--widths", default="1/8,1", help="comma-separated width multipliers")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=3, help="traced steps of each side")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="PyTorch intra-op threads (default: every core)")
  p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (written atomically)")
  args = p.parse_args(argv)
  args.models = args.models.split(",")
  for m in args.models:
    if m not in models.CFGS:
      p.error(f"--models: unknown VGG {m!r}; choose from {', '.join(models.CFGS)}")
  try:
    args.widths = [pp.parse_width(w) for w in args.widths.split(",")]
  except pp.UsageError as e:
    p.error(str(e))
  if any(not 0 < w <= 1 for w in args.widths) or args.batch < 1 or args.steps < 1:
    p.error("--widths must be in (0, 1], --batch and --steps at least 1")
  return args


def torch_kind(name: str) -> str:
  for needle, kind in TORCH_KINDS:
    if needle in name:
      return kind
  return "other (copies, elementwise, autograd bookkeeping)"


def profile_torch(torch, pp, name, width, images, labels, steps):
  """(ms per step by kind, ops per step, wall ms per step) of PyTorch's SGD step."""
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  model, opt = pp.torch_setup(torch, name, width)
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(np.array(labels, np.int64))
  for _ in range(10):  # oneDNN builds its primitives in the first steps
    pp.torch_step(torch, model, opt, x, y)
  t0 = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      pp.torch_step(torch, model, opt, x, y)
  wall = (time.perf_counter() - t0) / steps
  # Self time of every ATen op, so that nested calls are not counted twice.
  by_kind, ops = collections.defaultdict(float), 0
  for evt in prof.key_averages():
    if not evt.key.startswith("aten::") or evt.self_cpu_time_total <= 0:
      continue
    by_kind[torch_kind(evt.key)] += evt.self_cpu_time_total / 1e3 / steps
    ops += evt.count / steps
  return dict(by_kind), ops, 1e3 * wall


def profile_trainer(name, width, batch, steps, images, labels):
  """(ms per step by kind, ops per step, wall ms per step) of the trainer's SGD step."""
  # pylint: disable=import-outside-toplevel
  import jax
  from benchmarks import throughput as tp
  step, state, _ = pp.trainer_step(name, width, "sgd", batch)
  kernels = [tuple(k.shape) for k in jax.tree.leaves(state["params"]) if k.ndim == 4]
  fn = jax.jit(step, donate_argnums=(0,)).lower(state, images, labels).compile()
  kinds = tp.classify_ops(fn.as_text(), kernels)
  for _ in range(5):
    state, metrics = fn(state, images, labels)
  jax.block_until_ready(state)
  by_kind, ops, walls = collections.defaultdict(float), 0, []
  for _ in range(steps):
    state, wall, _, _, times = tp.profile_step(fn, state, images, labels, set())
    walls.append(wall)
    for op, ms in times.items():
      kind = kinds.get(op, ("other (not an HLO instruction name)", ""))[0]
      by_kind[kind] += ms / steps
      ops += 1 / steps
  return dict(by_kind), ops, 1e3 * float(np.median(walls))


def report(args, argv, torch, oo, rows, loads, seconds) -> str:
  cmd = "python benchmarks/peer_profile.py" + "".join(f" {a}" for a in argv)
  lines = ["# Where the step's time goes: the trainer against PyTorch (issue 21)", "",
           f"Command: `{cmd}`", "", oo.machine_line().replace(str(ROOT), "."),
           f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads.", "",
           f"{loads[0]}; {loads[1]}.", "",
           f"One process; each side warmed up, then {args.steps} traced SGD steps, batch "
           f"{args.batch}, float32; milliseconds per step. Op times are summed self times and "
           "may overlap across threads; tracing itself slows both sides, so the wall times "
           "here are above `peer_pytorch.py`'s.", ""]
  for name, width, t_kinds, t_ops, t_wall, p_kinds, p_ops, p_wall in rows:
    wl = pp.width_label(width)
    lines += [f"## {name} width {wl}", "",
              f"Traced step wall time: trainer {t_wall:.1f} ms ({t_ops:.0f} ops), PyTorch "
              f"{p_wall:.1f} ms ({p_ops:.0f} ATen ops); op time summed: trainer "
              f"{sum(t_kinds.values()):.1f} ms, PyTorch {sum(p_kinds.values()):.1f} ms.", "",
              "| trainer: kind of op | ms | | PyTorch: kind of op | ms |", "|---|---|---|---|---|"]
    left = sorted(t_kinds.items(), key=lambda kv: -kv[1])
    right = sorted(p_kinds.items(), key=lambda kv: -kv[1])
    for i in range(max(len(left), len(right))):
      a = left[i] if i < len(left) else ("", None)
      b = right[i] if i < len(right) else ("", None)
      lines.append(f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.2f}'} | | {b[0]} | "
                   f"{'' if b[1] is None else f'{b[1]:.2f}'} |")
    lines.append("")
  lines += [f"Total {seconds:.0f} s.", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  cli.set_cpu_xla_flags()  # the trainer's flags, before the first computation
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  try:
    torch = pp.import_torch()
  except pp.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  t0 = time.time()
  loads = [oo.load_line("at start")]
  rows = []
  for name in args.models:
    for width in args.widths:
      images, labels = oo.fake_batch(batch=args.batch)
      t = profile_trainer(name, width, args.batch, args.steps, images, labels)
      p = profile_torch(torch, pp, name, width, images, labels, args.steps)
      rows.append((name, width, *t, *p))
      print(f"  {name} w{width:g}: trainer {t[2]:.1f} ms, PyTorch {p[2]:.1f} ms", flush=True)
  loads.append(oo.load_line("at the end"))
  text = report(args, argv, torch, oo, rows, loads, time.time() - t0)
  pp.write_atomic(pathlib.Path(args.out), text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
