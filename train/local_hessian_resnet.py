"""Local Hessians of residual units on real CIFAR-10 images, against the unit scalars.

For every basic block (residual unit) of a CIFAR ResNet at initialization (``train.models``,
BatchNorm on batch statistics, ``γ = 1``, ``β = 0``), on a batch of real CIFAR-10 training
images, this measures the mean eigenvalue ``tr(J_zᵀ J_z) / d`` of the unit's input Hessian
(Hutchinson, Rademacher probes) for

* the unit ``σ(S(z) + F(z))`` (ReLU after the sum), the sum ``S + F`` without it, the branch
  ``F`` alone and the shortcut ``S`` alone;
* the cross term ``tr(J_Sᵀ J_F) / d`` that the scalars drop (``vᵀ J_Sᵀ J_F v`` per probe);
* the unit input's second moment ``v_in = E[z²]``, next to the signal-propagation recursion's
  prediction (``input_scale="propagated"``);

and sets them against ``m_{u,z}`` of :func:`optax_bm.unit_scalars` under both input-scale
readings (``"unit"``: ``v ≡ 1``; ``"propagated"``), the latter also with ``gamma_aware=True``
(each BatchNorm block's scalars times its ``E[γ²]``: at initialization ``γ = 1`` and it is
``"propagated"``; after training it is not). Writes a markdown table and a JSON file.

Usage::

  .venv/bin/python -m train.local_hessian_resnet --out train/results/local_hessian

The images are the first ``--batch-size`` of ``data_batch_1`` of the python-version CIFAR-10
(``--data-dir``, default ``../shared/data/cifar10/cifar-10-batches-py`` next to the repository;
anything ``train.data.load_cifar`` reads, ``sample`` for the shipped sample).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

import optax_bm  # noqa: E402
from optax_bm import hessian as hs  # noqa: E402
from train import atomic  # noqa: E402
from train import data as data_lib  # noqa: E402
from train import pipeline  # noqa: E402
from train import models  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "cifar10", "cifar-10-batches-py")


def log(msg: str) -> None:
  print(f"[local_hessian_resnet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_images(data_dir: str, n: int) -> jax.Array:
  """The first ``n`` training images (those of ``data_batch_1``), normalized per channel (NHWC
  float32). ``data_dir`` is anything :func:`train.data.load_cifar` reads, ``"sample"`` included;
  subsets are accepted (a copy of ``data_batch_1`` alone, say)."""
  try:
    images = data_lib.load_cifar("cifar10", data_dir, allow_subset=True).train_images
  except data_lib.DataError as e:
    raise SystemExit(f"error: --data-dir {data_dir}: {e}") from None
  if n > images.shape[0]:
    raise SystemExit(f"--batch-size {n} exceeds the {images.shape[0]} training images of "
                     f"{data_dir}")
  return pipeline.normalize(jnp.asarray(images[:n]), "cifar10")


def _pure(module):
  """``z -> module(z)`` as a pure function of ``z`` (training mode, state copied)."""
  graphdef, state = nnx.split(module)

  def fn(z):
    return nnx.merge(graphdef, state, copy=True)(z)

  return fn


def unit_parts(unit: models.BasicBlock):
  """The unit's pieces as pure functions of its input: σ(S + F), S + F, F, S."""
  main = [_pure(b) for b in unit.main]

  def branch(z):
    for f in main:
      z = f(z)
    return z

  if unit.option == "B":
    shortcut = _pure(unit.shortcut[0])
  elif unit.option == "A":
    shortcut = lambda z: models.subsample_shortcut(z, unit.out_features)  # noqa: E731
  else:
    shortcut = lambda z: z  # noqa: E731
  summed = lambda z: shortcut(z) + branch(z)  # noqa: E731
  return {"relu_sum": lambda z: jax.nn.relu(summed(z)), "sum": summed, "branch": branch,
          "shortcut_only": shortcut}


def mean_eig(fn, z, key, probes):
  """``tr(J_zᵀ J_z) / d`` of ``fn`` at ``z`` by Hutchinson (value, standard error)."""

  @jax.jit
  def run(z, key):
    mv = hs.gauss_newton_matvec(fn, z)
    t = hs.mean_eigenvalue(lambda v: mv(v.reshape(z.shape)).ravel(), z.size, probes, key)
    return t.value, t.stderr

  return [float(x) for x in run(z, key)]


def cross_term(f_s, f_f, z, key, probes):
  """``tr(J_Sᵀ J_F) / d``: the mean of ``(J_S v)·(J_F v)`` over Rademacher ``v``, over ``d``."""

  @jax.jit
  def run(z, key):
    def one(i):
      v = jax.random.rademacher(jax.random.fold_in(key, i), z.shape, z.dtype)
      js = jax.jvp(f_s, (z,), (v,))[1]
      jf = jax.jvp(f_f, (z,), (v,))[1]
      return jnp.vdot(js, jf)

    samples = jax.lax.map(one, jnp.arange(probes))
    return jnp.mean(samples) / z.size, jnp.std(samples, ddof=1) / np.sqrt(probes) / z.size

  return [float(x) for x in run(z, key)]


# The scalar readings set against the measurements: name -> (input_scale, gamma_aware).
READINGS = {"unit": ("unit", False), "propagated": ("propagated", False),
            "propagated_gamma": ("propagated", True)}


def measure(name: str, width: float, images: jax.Array, probes: int, seed: int,
            max_units: Optional[int] = None, params=None, num_classes: int = 10) -> dict:
  """Measures every residual unit (the first ``max_units`` only, if given), at
  initialization or, with ``params`` (a pure dict, as a checkpoint holds), at those weights."""
  model = models.create(name, num_classes, width=width, rngs=nnx.Rngs(seed))
  if params is not None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
  # BatchNorm on batch statistics, as in training: the local Hessians of the step taken.
  model.train()
  specs = optax_bm.annotate(model, images[:2])
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  readings = {r: optax_bm.unit_scalars(specs, params, input_scale=scale, gamma_aware=gamma)
              for r, (scale, gamma) in READINGS.items()}
  key = jax.random.key(seed)
  z = _pure(model.stem)(images)
  rows = []
  for i, unit in enumerate(model.units[:max_units]):
    u = i + 1  # unit 0 is the stem
    parts = unit_parts(unit)
    k = jax.random.fold_in(key, u)
    row = {"unit": u, "basic_block": i, "shortcut": {"A": "subsample", "B": "projection"}.get(
        unit.option, "identity"), "v_in": float(jnp.mean(z * z)),
           "v_in_propagated": float(readings["propagated"][u].v_in)}
    for part, fn in parts.items():
      row[part], row[part + "_se"] = mean_eig(fn, z, k, probes)
    row["cross"], row["cross_se"] = cross_term(parts["shortcut_only"], parts["branch"], z, k,
                                               probes)
    for r, sc in readings.items():
      row["m_uz_" + r] = float(sc[u].m_z)
    rows.append(row)
    log(f"unit {u} ({row['shortcut']}): v_in {row['v_in']:.2f} "
        f"(predicted {row['v_in_propagated']:.2f}), measured {row['relu_sum']:.3f} with ReLU, "
        f"{row['sum']:.3f} without; m_uz unit {row['m_uz_unit']:.3f}, propagated "
        f"{row['m_uz_propagated']:.3f}")
    z = parts["relu_sum"](z)
  return {"model": name, "width": width, "batch": int(images.shape[0]), "probes": probes,
          "seed": seed, "rows": rows}


def _log_ratio_stats(rows, key, reading):
  r = np.log([row[key] / row["m_uz_" + reading] for row in rows])
  return float(np.exp(np.mean(r))), float(np.std(r))


def markdown(result: dict, when: str = "at initialization", heading: str = "#") -> str:
  rows = result["rows"]
  weights = "(γ = 1, β = 0)" if when == "at initialization" else "(γ, β as trained)"
  out = [f"{heading} Local Hessians of residual units {when} ({result['model']}, width "
         f"{result['width']:g})", "",
         f"{result['batch']} real CIFAR-10 training images (the first of `data_batch_1`), "
         f"BatchNorm on batch statistics {weights}, seed {result['seed']}; each unit's "
         f"input Hessian `H_z = J_zᵀ J_z` by its mean eigenvalue `tr(H_z)/d` (Hutchinson, "
         f"{result['probes']} Rademacher probes; standard errors in the JSON). `v_in`: the "
         "unit input's measured second moment, and the signal-propagation recursion's "
         "prediction (`input_scale=\"propagated\"`). `m_uz`: `optax_bm.unit_scalars` under "
         "each reading. Written by `train/local_hessian_resnet.py`.", "",
         "| unit | shortcut | v_in | v_in predicted | with ReLU after the sum | without it | "
         "branch alone | shortcut alone | cross term | m_uz `unit` (v ≡ 1) | m_uz "
         "`propagated` | m_uz `propagated`, γ²-aware |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['unit']} | {r['shortcut']} | {r['v_in']:.2f} | {r['v_in_propagated']:.2f} "
               f"| {r['relu_sum']:.3f} | {r['sum']:.3f} | {r['branch']:.3f} | "
               f"{r['shortcut_only']:.3f} | {r['cross']:+.3f} | "
               f"{r['m_uz_unit']:.3f} | {r['m_uz_propagated']:.3f} | "
               f"{r['m_uz_propagated_gamma']:.3f} |")
  out += ["", "Measured over predicted (geometric mean over units, and the standard deviation "
          "of the log ratio: a trend the reading misses shows as a large spread):", "",
          "| measured | reading `unit` | reading `propagated` | `propagated`, γ²-aware |",
          "|---|---|---|---|"]
  for key, label in (("relu_sum", "with ReLU after the sum"), ("sum", "without it")):
    stats = [_log_ratio_stats(rows, key, r) for r in READINGS]
    out.append(f"| {label} | " + " | ".join(f"{g:.2f} (±{sd:.2f})" for g, sd in stats) + " |")
  rel = [abs(r["sum"] - r["branch"] - r["shortcut_only"]) / r["sum"] for r in rows]
  vrel = [r["v_in_propagated"] / r["v_in"] for r in rows]
  out += ["", f"The sum adds: `|without − branch − shortcut| / without` is at most "
          f"{max(rel):.3f} (the cross term `2 tr(J_Sᵀ J_F)/d` is "
          f"{min(2 * r['cross'] for r in rows):+.3f} to {max(2 * r['cross'] for r in rows):+.3f}). "
          f"The ReLU after the sum multiplies the unit's mean eigenvalue by "
          f"{min(r['relu_sum'] / r['sum'] for r in rows):.2f}–"
          f"{max(r['relu_sum'] / r['sum'] for r in rows):.2f}. The recursion's `v_in` is "
          f"{min(vrel):.2f}–{max(vrel):.2f} × the measured one.", ""]
  return "\n".join(out)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="resnet20", choices=models.RESNETS)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--probes", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=DEFAULT_DATA)
  p.add_argument("--out", default=os.path.join(REPO, "train", "results", "local_hessian"))
  p.add_argument("--max-units", type=int, default=None,
                 help="measure only the first N units (a quick look)")
  p.add_argument("--checkpoint", action="append", default=None, metavar="WORKDIR",
                 help="a train/cifar.py work directory of a CIFAR-10 ResNet (repeatable): "
                      "measure at its last checkpoint instead of at initialization; writes "
                      "<model>_trained.md/.json")
  args = p.parse_args(argv)
  images = load_images(args.data_dir, args.batch_size)
  os.makedirs(args.out, exist_ok=True)
  if args.checkpoint:
    trained(args, images)
    return
  result = measure(args.model, args.width, images, args.probes, args.seed)
  stem = "resnet" if args.model == "resnet20" else args.model
  with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
    f.write(markdown(result))
  log(f"wrote {os.path.join(args.out, stem + '.md')}")


def trained(args, images) -> None:
  """The measurement at each ``--checkpoint``'s last checkpoint: ``<model>_trained.md``."""
  # pylint: disable=import-outside-toplevel
  from train.local_hessian import checkpoint_names, describe_run
  from train.local_hessian_vgg import CheckpointUnavailable, load_checkpoint
  names = checkpoint_names(args)
  sections, results, model = [], {}, None
  for workdir in args.checkpoint:
    try:
      name, width, num_classes, params, epoch, opt = load_checkpoint(workdir)
    except CheckpointUnavailable as e:
      raise SystemExit(f"error: --checkpoint {workdir}: {e}") from None
    if name not in models.RESNETS or num_classes != 10:
      raise SystemExit(f"error: --checkpoint {workdir}: holds {name} on {num_classes} classes; "
                       "this measures CIFAR-10 ResNets")
    if model not in (None, name):
      raise SystemExit(f"error: --checkpoint {workdir}: holds {name}, the first one {model}")
    model = name
    log(f"{names[workdir]}: {name} width {width:g}, epoch {epoch}, {opt}")
    result = measure(name, width, images, args.probes, args.seed, args.max_units,
                     params=params)
    result.update(optimizer=opt, epoch=epoch, run=names[workdir])
    results[names[workdir]] = result
    sections.append(f"{names[workdir]}: {describe_run(workdir)}; measured at its checkpoint of "
                    f"epoch {epoch}.\n\n"
                    + markdown(result, f"after training ({opt}, epoch {epoch})", "##"))
  stem = ("resnet" if model == "resnet20" else model) + "_trained"
  text = (f"# Local Hessians of residual units after training ({model})\n\n"
          "The table of `resnet.md` (at initialization) at trained weights: does each "
          "assumption of docs/method.md#7-residual-networks still hold? Written by "
          "`train/local_hessian_resnet.py --checkpoint`.\n\n" + "\n".join(sections))
  for suffix, body in ((".json", json.dumps(results, indent=1)), (".md", text)):
    atomic.write_text(os.path.join(args.out, stem + suffix), body)
  log(f"wrote {os.path.join(args.out, stem + '.md')}")


if __name__ == "__main__":
  main()
