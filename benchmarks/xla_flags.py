"""XLA:CPU flags against the trainer's step, each in its own process, processes alternated.

XLA reads ``$XLA_FLAGS`` once per process, so each flag set is measured in a fresh process
(the trainer's ``train.steps.train_step``, SGD, after the trainer's own flags), and the flag
sets are alternated ``--rounds`` times so that a change in the machine's load affects them
alike. A sample is ``--calls`` back-to-back steps; each process reports the fastest and the
median of ``--samples`` samples. Issue 21 asks that every flag tried be reported with its
effect, kept or not: this is that table.

Usage::

  python benchmarks/xla_flags.py --model vgg11 --width 1/8
  python benchmarks/xla_flags.py --flags=--xla_cpu_use_thunk_runtime=false --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks import peer_pytorch as pp  # noqa: E402  pylint: disable=wrong-import-position
from train import cli  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "xla_flags.md"
CANDIDATES = ("--xla_cpu_use_thunk_runtime=false", "--xla_cpu_enable_fast_math=true",
              "--xla_cpu_multi_thread_eigen=false")


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="vgg11")
  p.add_argument("--width", default="1/8")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--flags", action="append", default=None, metavar="FLAGS",
                 help="a flag set to measure (repeatable; default: "
                      f"{', '.join(CANDIDATES)}, each alone); the trainer's flags always apply")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--samples", type=int, default=7)
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--out", default=str(DEFAULT_OUT))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  try:
    args.width_value = pp.parse_width(args.width)
  except pp.UsageError:
    p.error(f"--width {args.width!r}: expected a number or a fraction like 1/8")
  if min(args.rounds, args.samples, args.calls, args.batch) < 1:
    p.error("--rounds, --samples, --calls and --batch must be at least 1")
  return args


def child(args) -> None:
  """One process: the trainer's step under this process's $XLA_FLAGS; prints a JSON line."""
  cli.set_cpu_xla_flags()
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  step, state, _ = pp.trainer_step(args.model, args.width_value, "sgd", args.batch)
  images, labels = oo.fake_batch(batch=args.batch)
  fn = jax.jit(step, donate_argnums=(0,)).lower(state, images, labels).compile()
  for _ in range(5):
    state, _ = fn(state, images, labels)
  jax.block_until_ready(state)
  ts = []
  for _ in range(args.samples):
    t0 = time.perf_counter()
    for _ in range(args.calls):
      state, _ = fn(state, images, labels)
    jax.block_until_ready(state)
    ts.append((time.perf_counter() - t0) / args.calls)
  print(json.dumps({"min_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts)}))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.child:
    child(args)
    return 0
  sets = [""] + list(args.flags or CANDIDATES)
  results = {s: [] for s in sets}
  base = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", "--model",
          args.model, "--width", args.width, "--batch", str(args.batch), "--samples",
          str(args.samples), "--calls", str(args.calls)]
  loads = [os.getloadavg()]
  t0 = time.time()
  for r in range(args.rounds):
    for s in sets[r % len(sets):] + sets[:r % len(sets)]:
      env = dict(os.environ, XLA_FLAGS=s)
      env.pop("JAX_PLATFORMS", None)
      proc = subprocess.run(base, env=env, capture_output=True, text=True, cwd=ROOT)
      if proc.returncode != 0:
        results[s].append({"error": proc.stderr.strip().splitlines()[-1][:200]
                           if proc.stderr.strip() else f"exit {proc.returncode}"})
      else:
        results[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
      print(f"  round {r + 1} {s or '(the trainer flags only)'}: {results[s][-1]}", flush=True)
  loads.append(os.getloadavg())
  ok = lambda rs, k: [x[k] for x in rs if k in x]  # noqa: E731
  base_min = statistics.median(ok(results[""], "min_ms")) if ok(results[""], "min_ms") else None
  lines = ["# XLA:CPU flags on the trainer's step (issue 21)", "",
           f"Command: `python benchmarks/xla_flags.py {' '.join(argv)}`".rstrip(), "",
           f"{args.model} width {args.width}, batch {args.batch}, SGD, `train.steps.train_step`; "
           f"each flag set in its own process on top of the trainer's flags "
           f"(`{' '.join(cli.CPU_XLA_FLAGS)}`), {args.rounds} alternated rounds, each a "
           f"process measuring {args.samples} samples of {args.calls} steps. Load average "
           f"(1 min) {loads[0][0]:.2f} at start, {loads[1][0]:.2f} at the end, "
           f"{os.cpu_count()} cores; {time.time() - t0:.0f} s.", "",
           "| XLA_FLAGS added | fastest sample, ms (per round) | median sample, ms (per round) | "
           "fastest / baseline's (median over rounds) |", "|---|---|---|---|"]
  for s in sets:
    mins, meds = ok(results[s], "min_ms"), ok(results[s], "median_ms")
    errors = [x["error"] for x in results[s] if "error" in x]
    rel = (f"{statistics.median(mins) / base_min:.3f}" if mins and base_min else "—")
    lines.append(f"| {('`' + s + '`') if s else '(none: the baseline)'} | "
                 f"{', '.join(f'{m:.1f}' for m in mins) or '—'} | "
                 f"{', '.join(f'{m:.1f}' for m in meds) or '—'} | {rel}"
                 f"{' (failed: ' + errors[0] + ')' if errors else ''} |")
  text = "\n".join(lines) + "\n"
  pp.write_atomic(pathlib.Path(args.out), text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
