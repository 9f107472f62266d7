"""The trainer's training step (and epoch) against PyTorch's, on the same CPU, in one process.

Side by side, interleaved (issue 21): for every model and width, in one process,

* **PyTorch**: the same network in ``torch`` (oneDNN, ``channels_last``, float32,
  ``torch.set_num_threads(os.cpu_count())``): VGG-BN with :data:`train.models.CFGS`' channel
  plan and the trainer's rounding of widths (``train.models.scaled_channels``), or the CIFAR
  ResNet with option-A shortcuts (stride-2 subsampling + zero-padded channels); BatchNorm with
  Flax's defaults as the trainer sets them (momentum 0.9 in Flax's convention = 0.1 in
  PyTorch's, eps 1e-5); ``torch.optim.SGD`` lr 0.1, Nesterov momentum 0.9, weight decay 1e-3
  (the trainer's SGD); cross-entropy. The parameter counts of both models are printed and
  must agree (else exit 1).
* **trainer SGD** and **trainer scale-amended**: the trainer's own ``train.steps.train_step``
  built by ``train.state.create_train_state`` (through ``benchmarks/optimizer_overhead.py``'s
  ``train_state_and_step``), jitted with the state donated, with the trainer's XLA:CPU flags
  (``train.cli.set_cpu_xla_flags``) and its small-map convolution; the batch on the device,
  ``block_until_ready`` at the end of every sample.

Timing (``optimizer_overhead.Chain``/``interleaved``): every side is warmed up (compiled),
then ``--repeats`` samples of each, the order rotated every repetition, a sample being ``k``
back-to-back steps (``k`` calibrated to about ``--sample-seconds``) divided by ``k``. Reported:
medians (ms/step, img/s) and the medians of the per-repetition ratios (trainer / PyTorch,
scale-amended / SGD), so that load from other processes affects both sides alike.

``--epoch`` adds the whole epoch on the full CIFAR-10 training set (``--data-dir``, default
``../shared/data/cifar10/cifar-10-batches-py`` relative to the repository): the trainer's
``train.steps.EpochRunner`` (data on the device, on-device augmentation, one step per call
as the trainer runs on a CPU) against a plain PyTorch loop (``randperm``, the last partial
batch dropped; 4-pixel zero-pad random crop + horizontal flip on ``uint8`` tensors, then
normalization with the trainer's channel statistics), both SGD, the two epochs interleaved.

PyTorch is an optional extra (``pip install -e '.[peer]'``, torch 2.13.0 CPU); nothing else
needs it.

Usage::

  python benchmarks/peer_pytorch.py                 # VGG11/13/16 at width 1/8 and 1, resnet20 at 1
  python benchmarks/peer_pytorch.py --quick         # tiny: VGG11 at width 1/16, batch 16
  python benchmarks/peer_pytorch.py --models vgg11 --widths 1/8 --epoch
"""

from __future__ import annotations

import argparse
import fractions
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time
from typing import Any, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a fresh checkout
  sys.path.insert(0, str(ROOT))

import numpy as np  # pylint: disable=g-import-not-at-top

from train import models

DEFAULT_MODELS = ("vgg11", "vgg13", "vgg16", "resnet20")
DEFAULT_WIDTHS = ("1/8", "1")
SUPPORTED = tuple(models.CFGS) + tuple(models.RESNET_DEPTHS)  # option-A ResNets only
DEFAULT_OUT = "benchmarks/results/peer_pytorch.md"
DEFAULT_DATA = "../shared/data/cifar10/cifar-10-batches-py"
INSTALL_HINT = "pip install -e '.[peer]'"
NUM_CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3  # the trainer's SGD (train.config.PAPER_SETTINGS)
MIN_CHANNELS = 4  # train.config.MIN_CHANNELS


class UsageError(ValueError):
  """Bad flags: one line on stderr, exit 2."""


# ---------------------------------------------------------------------------------------------
# Flags


def parse_width(s: str) -> float:
  try:
    w = float(fractions.Fraction(s.strip()))
  except (ValueError, ZeroDivisionError) as e:
    raise UsageError(f"--widths: {s!r} is not a number or fraction like 1/8") from e
  if not w > 0:
    raise UsageError(f"--widths: {s!r} must be positive")
  return w


def width_label(w: float) -> str:
  if w == 1:
    return "1"
  f = fractions.Fraction(w).limit_denominator(64)
  return f"{f.numerator}/{f.denominator}" if abs(float(f) - w) < 1e-12 else f"{w:g}"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--models", default=None,
                 help=f"comma-separated, from {', '.join(SUPPORTED)} "
                      f"(default {','.join(DEFAULT_MODELS)}; quick vgg11)")
  p.add_argument("--widths", default=None,
                 help=f"comma-separated channel multipliers, fractions allowed "
                      f"(default {','.join(DEFAULT_WIDTHS)}; quick 1/16)")
  p.add_argument("--batch-size", type=int, default=None, help="default 128, quick 16")
  p.add_argument("--repeats", type=int, default=None,
                 help="interleaved repetitions; the median is reported (default 9, quick 2)")
  p.add_argument("--sample-seconds", type=float, default=None,
                 help="target length of one sample (default 0.5, quick 0.02)")
  p.add_argument("--quick", action="store_true",
                 help="tiny (tests): VGG11 at width 1/16, batch 16, 2 repeats")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default os.cpu_count(); 1 avoids OpenMP barrier "
                      "stalls when other processes hold the cores)")
  p.add_argument("--epoch", action="store_true",
                 help="also the whole epoch on the full CIFAR-10: trainer vs a plain PyTorch loop")
  p.add_argument("--epoch-repeats", type=int, default=1,
                 help="interleaved epochs of each side (after one warm-up epoch-start)")
  p.add_argument("--epoch-steps", type=int, default=0,
                 help="time only the first N steps of each epoch (0: the whole epoch)")
  p.add_argument("--data-dir", default=None,
                 help=f"CIFAR-10 for --epoch (default {DEFAULT_DATA}, relative to the repository)")
  p.add_argument("--out", default=DEFAULT_OUT, help="markdown report (written atomically)")
  p.add_argument("--xla-default-scheduler", action="store_true",
                 help="keep XLA:CPU's concurrency-optimized scheduler (the trainer turns it off)")
  return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
  """Defaults and validation, before any work; raises :class:`UsageError`."""
  q = args.quick
  names = [m.strip().lower() for m in (args.models or ("vgg11" if q else ",".join(DEFAULT_MODELS))).split(",") if m.strip()]
  if not names:
    raise UsageError("--models: no model given")
  bad = [m for m in names if m not in SUPPORTED]
  if bad:
    raise UsageError(f"--models: unknown {', '.join(bad)}; choose from {', '.join(SUPPORTED)}")
  widths = [parse_width(w) for w in (args.widths or ("1/16" if q else ",".join(DEFAULT_WIDTHS))).split(",") if w.strip()]
  if not widths:
    raise UsageError("--widths: no width given")
  # (width, model) pairs, widths outer. Too narrow a width for a model is an error when the
  # widths were given; with the default widths it is skipped (resnet20's 16 channels at 1/8).
  args.combos, args.skipped = [], []
  for w in widths:
    for m in names:
      c = models.scaled_channels(16 if m.startswith("resnet") else 64, w)
      if c >= MIN_CHANNELS:
        args.combos.append((w, m))
      elif args.widths:
        raise UsageError(f"--widths: {width_label(w)} gives {m} a {c}-channel layer (the "
                         f"trainer's minimum is {MIN_CHANNELS})")
      else:
        args.skipped.append(f"{m} at width {width_label(w)} ({c}-channel layers)")
  args.batch_size = args.batch_size if args.batch_size is not None else (16 if q else 128)
  if args.batch_size < 2:
    raise UsageError(f"--batch-size must be at least 2 (BatchNorm), got {args.batch_size}")
  args.repeats = args.repeats if args.repeats is not None else (2 if q else 9)
  if args.repeats < 1:
    raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
  args.sample_seconds = (args.sample_seconds if args.sample_seconds is not None
                         else (0.02 if q else 0.5))
  if not args.sample_seconds > 0:
    raise UsageError(f"--sample-seconds must be positive, got {args.sample_seconds}")
  args.torch_threads = args.torch_threads if args.torch_threads is not None else (os.cpu_count() or 1)
  if args.torch_threads < 1:
    raise UsageError(f"--torch-threads must be at least 1, got {args.torch_threads}")
  if args.epoch_repeats < 1:
    raise UsageError(f"--epoch-repeats must be at least 1, got {args.epoch_repeats}")
  if args.epoch_steps < 0:
    raise UsageError(f"--epoch-steps must be ≥ 0, got {args.epoch_steps}")
  if args.epoch:
    d = pathlib.Path(args.data_dir) if args.data_dir else ROOT / DEFAULT_DATA
    if not d.exists():
      raise UsageError(f"--epoch: no CIFAR-10 at {args.data_dir or DEFAULT_DATA} (give --data-dir)")
    args.data_path = d
  out_dir = pathlib.Path(args.out).parent
  if str(out_dir) and out_dir.exists() and not out_dir.is_dir():
    raise UsageError(f"--out: {out_dir} is not a directory")
  return args


def import_torch():
  """``torch``, or :class:`UsageError` with the install line."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UsageError(f"PyTorch is not installed; {INSTALL_HINT}  (torch 2.13.0, CPU)") from e
  return torch


# ---------------------------------------------------------------------------------------------
# The PyTorch models (the same networks as train/models.py)


def torch_model(torch, name: str, width: float):
  nn = torch.nn
  bn = lambda c: nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # Flax momentum 0.9

  if name in models.CFGS:
    layers, cin = [], 3
    for item in models.CFGS[name]:
      if item == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        c = models.scaled_channels(int(item), width)
        layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), bn(c), nn.ReLU(inplace=True)]
        cin = c
    pools = sum(1 for i in models.CFGS[name] if i == "M")
    hw = 32 // 2 ** pools
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * hw * hw, NUM_CLASSES))

  F = torch.nn.functional

  class Block(nn.Module):
    """Post-activation basic block, option-A shortcut (as train.models.BasicBlock)."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
      self.bn1 = bn(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
      self.bn2 = bn(cout)
      self.stride, self.cin, self.cout = stride, cin, cout

    def forward(self, x):
      f = F.relu(self.bn1(self.conv1(x)))
      f = self.bn2(self.conv2(f))
      s = x
      if self.stride == 2:
        s = x[:, :, ::2, ::2]
        pad = self.cout - self.cin
        s = F.pad(s, (0, 0, 0, 0, pad // 2, pad - pad // 2))
      elif self.cin != self.cout:
        s = F.pad(s, (0, 0, 0, 0, 0, self.cout - self.cin))
      return F.relu(s + f)

  class ResNet(nn.Module):

    def __init__(self, n):
      super().__init__()
      stages = [models.scaled_channels(c, width) for c in models.RESNET_STAGES]
      self.stem = nn.Sequential(nn.Conv2d(3, stages[0], 3, padding=1, bias=False),
                                bn(stages[0]), nn.ReLU(inplace=True))
      units, cin = [], stages[0]
      for i, cout in enumerate(stages):
        for j in range(n):
          units.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
          cin = cout
      self.units = nn.Sequential(*units)
      self.classifier = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
      x = self.units(self.stem(x))
      return self.classifier(x.mean(dim=(2, 3)))

  return ResNet(models.RESNET_DEPTHS[name])


def torch_setup(torch, name: str, width: float, seed: int = 0):
  torch.manual_seed(seed)
  model = torch_model(torch, name, width).to(memory_format=torch.channels_last)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                        weight_decay=WEIGHT_DECAY)
  return model, opt


def torch_step(torch, model, opt, x, y):
  opt.zero_grad(set_to_none=True)
  loss = torch.nn.functional.cross_entropy(model(x), y)
  loss.backward()
  opt.step()
  return loss


class TorchChain:
  """``optimizer_overhead.Chain``'s interface for PyTorch: ``k`` steps, seconds per step."""

  def __init__(self, torch, model, opt, x, y):
    self.torch, self.model, self.opt, self.x, self.y = torch, model, opt, x, y
    self.k = 1

  def __call__(self, k: Optional[int] = None) -> float:
    k = self.k if k is None else k
    t0 = time.perf_counter()
    for _ in range(k):
      loss = torch_step(self.torch, self.model, self.opt, self.x, self.y)
    loss.item()  # CPU: already synchronous; reading the loss makes sure
    return (time.perf_counter() - t0) / k

  def calibrate(self, sample_seconds: float, max_k: int = 50, max_warmup: int = 40) -> float:
    """Warm-up, then ``k`` so that one sample lasts about ``sample_seconds``.

    oneDNN creates (JIT-compiles) its primitives during the first calls: measured here, the
    first five steps of a tiny VGG took 30× a settled step. So warm up with at least 5 calls
    and until the last three are within 1.5× of the fastest (at most ``max_warmup`` calls, 20 s).
    """
    ts = [self(1) for _ in range(5)]
    while (len(ts) < max_warmup and sum(ts) < 20.0 and max(ts[-3:]) > 1.5 * min(ts)):
      ts.append(self(1))
    t = min(ts[-3:])
    self.k = int(min(max_k, max(1, -(-sample_seconds // max(t, 1e-6)))))
    return t


PAUSE_S = 0.05


class Paused:
  """A chain that sleeps :data:`PAUSE_S` before every sample.

  Both runtimes keep worker threads spinning for a while after their work (libgomp's
  OpenMP team, XLA's thread pool); in one process on a few cores the spinning threads of the
  side that just ran would steal time from the next one. The pause lets them go idle.
  """

  def __init__(self, chain):
    self.chain = chain

  def __call__(self) -> float:
    time.sleep(PAUSE_S)
    return self.chain()


# ---------------------------------------------------------------------------------------------
# The trainer's side


def trainer_state(name: str, width: float, optimizer: str, batch: int, steps_per_epoch: int = 390,
                  data_dir: Optional[str] = None):
  """``(config, Setup, host state, source)`` of the trainer for ``name`` (VGG or ResNet):
  ``train.state.create_train_state`` itself, at the paper's learning rate."""
  # pylint: disable=import-outside-toplevel
  from train import config as config_lib, state as state_lib
  config = config_lib.Config(model=name, width=width, optimizer=optimizer,
                             lr=config_lib.PAPER_SETTINGS[optimizer][0], batch_size=batch,
                             data_dir=data_dir).resolved()
  setup, state = state_lib.create_train_state(config, NUM_CLASSES, steps_per_epoch)
  return config, setup, state, "train.state.create_train_state + train.steps.train_step"


def trainer_step(name: str, width: float, optimizer: str, batch: int):
  """``(step_fn(state, images, labels), state, source)``, as ``optimizer_overhead``'s."""
  import functools  # pylint: disable=import-outside-toplevel
  from train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  _, setup, state, source = trainer_state(name, width, optimizer, batch)
  return functools.partial(steps_lib.train_step, setup=setup), state, source


# ---------------------------------------------------------------------------------------------
# Step benchmark


def bench_step(torch, oo, name: str, width: float, batch: int, repeats: int,
               sample_seconds: float) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  images, labels = oo.fake_batch(batch=batch)
  chains, n_params = {}, {}
  for opt_name in ("sgd", "scale_amended"):
    step, state, source = trainer_step(name, width, opt_name, batch)
    n_params["trainer"] = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    fn = jax.jit(step, donate_argnums=(0,))
    t0 = time.perf_counter()
    fn = fn.lower(state, images, labels).compile()
    print(f"  {name} w{width_label(width)} trainer {opt_name}: compiled in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    chains[opt_name] = oo.Chain(fn, (state,), (images, labels), 1)
  model, opt = torch_setup(torch, name, width)
  n_params["pytorch"] = sum(p.numel() for p in model.parameters())
  print(f"  {name} w{width_label(width)} parameters: PyTorch {n_params['pytorch']:,}, trainer "
        f"{n_params['trainer']:,}", flush=True)
  if n_params["pytorch"] != n_params["trainer"]:
    raise AssertionError(f"{name} width {width_label(width)}: parameter counts differ "
                         f"(PyTorch {n_params['pytorch']}, trainer {n_params['trainer']})")
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(np.array(labels, np.int64))
  chains = {"pytorch": TorchChain(torch, model, opt, x, y), **chains}
  for c in chains.values():
    c.calibrate(sample_seconds, max_k=50)
  times = oo.interleaved({n: Paused(c) for n, c in chains.items()}, repeats)
  loss = float(torch_step(torch, model, opt, x, y).item())
  if not np.isfinite(loss):
    raise AssertionError(f"{name}: PyTorch loss is not finite ({loss})")
  med = {n: float(np.median(t)) for n, t in times.items()}
  ratio = lambda a, b: float(np.median(np.asarray(times[a]) / np.asarray(times[b])))
  return {"model": name, "width": width, "batch": batch, "ms": {n: 1e3 * v for n, v in med.items()},
          "img_s": {n: batch / v for n, v in med.items()},
          "sgd_vs_torch": ratio("sgd", "pytorch"), "sa_vs_torch": ratio("scale_amended", "pytorch"),
          "sa_vs_sgd": ratio("scale_amended", "sgd"), "k": {n: c.k for n, c in chains.items()},
          "params": n_params, "source": source}


# ---------------------------------------------------------------------------------------------
# Epoch benchmark


def torch_augment(torch, images_u8, gen):
  """4-pixel zero-pad random crop + horizontal flip, per image; ``[B, 32, 32, 3]`` uint8."""
  b, h, w, _ = images_u8.shape
  padded = torch.nn.functional.pad(images_u8, (0, 0, 4, 4, 4, 4))
  oy = torch.randint(0, 9, (b,), generator=gen)
  ox = torch.randint(0, 9, (b,), generator=gen)
  flip = torch.rand(b, generator=gen) < 0.5
  ar = torch.arange(w)
  cols = torch.where(flip[:, None], ar.flip(0)[None, :], ar[None, :]) + ox[:, None]
  rows = oy[:, None] + torch.arange(h)[None, :]
  bi = torch.arange(b)[:, None, None]
  return padded[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]


def torch_epoch(torch, model, opt, images_u8, labels, batch, mean, std, gen, max_steps):
  n = images_u8.shape[0]
  perm = torch.randperm(n, generator=gen)
  steps = n // batch if not max_steps else min(max_steps, n // batch)
  t0 = time.perf_counter()
  for i in range(steps):
    idx = perm[i * batch:(i + 1) * batch]
    x = torch_augment(torch, images_u8[idx], gen)
    x = ((x.float() / 255.0 - mean) / std).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    loss = torch_step(torch, model, opt, x, labels[idx])
  loss.item()
  return time.perf_counter() - t0, steps


def bench_epoch(torch, name: str, width: float, batch: int, data_path, repeats: int,
                max_steps: int) -> dict:
  # pylint: disable=import-outside-toplevel
  import jax
  from train import config as config_lib, pipeline, steps as steps_lib
  mesh = pipeline.make_mesh()
  config = config_lib.Config(model=name, width=width, optimizer="sgd", batch_size=batch,
                             lr=LR, data_dir=str(data_path)).resolved()
  data = pipeline.load_data(config, mesh, pipeline.pad_to(1000, mesh.devices.size))
  steps_per_epoch = data.num_train // batch
  config, setup, state, _ = trainer_state(name, width, "sgd", batch, steps_per_epoch,
                                          str(data_path))
  state = pipeline.replicate(state, mesh)
  runner = steps_lib.EpochRunner(setup, mesh, config, data, steps_per_epoch,
                                 pipeline.pad_to(1000, mesh.devices.size), steps_per_call=1)
  t0 = time.perf_counter()
  runner.compile(state)
  print(f"  epoch {name} w{width_label(width)}: trainer compiled in "
        f"{time.perf_counter() - t0:.1f} s; {data.num_train} images, {steps_per_epoch} steps",
        flush=True)
  plan = runner.train_plan[:max_steps] if max_steps else runner.train_plan

  def jax_epoch(state, epoch, plan):
    d = runner.data
    t0 = time.perf_counter()
    batches, key = runner.batches_fn(runner._scalar(epoch))  # pylint: disable=protected-access
    sums = pipeline.replicate(jax.device_get(steps_lib.zero_metrics(setup)), mesh)
    for first, k in plan:
      state, sums = runner.train_fns[k](state, sums, d.train_images, d.train_labels, batches,
                                        key, runner._scalar(first))  # pylint: disable=protected-access
    jax.block_until_ready((state, sums))
    return time.perf_counter() - t0, state, sums

  images_u8 = torch.from_numpy(np.asarray(jax.device_get(data.train_images))[:data.num_train])
  labels = torch.from_numpy(np.asarray(jax.device_get(data.train_labels))[:data.num_train].astype(np.int64))
  mean, std = (torch.tensor(np.asarray(s, np.float32)) for s in pipeline.CHANNEL_STATS["cifar10"])
  model, opt = torch_setup(torch, name, width)
  gen = torch.Generator().manual_seed(0)
  # Warm-up: a few steps of each (first executions, allocations, oneDNN primitive caches).
  torch_epoch(torch, model, opt, images_u8, labels, batch, mean, std, gen, 3)
  _, state, _ = jax_epoch(state, 0, plan[:3])
  times = {"pytorch": [], "trainer": []}
  for r in range(repeats):
    for side in (("pytorch", "trainer") if r % 2 == 0 else ("trainer", "pytorch")):
      if side == "pytorch":
        dt, steps = torch_epoch(torch, model, opt, images_u8, labels, batch, mean, std, gen,
                                max_steps)
      else:
        dt, state, sums = jax_epoch(state, r + 1, plan)
        loss = float(jax.device_get(sums["loss"]) / jax.device_get(sums["count"]))
        if not np.isfinite(loss):
          raise AssertionError(f"trainer epoch loss not finite ({loss})")
      times[side].append(dt)
  med = {n: float(np.median(t)) for n, t in times.items()}
  return {"model": name, "width": width, "batch": batch, "steps": len(plan),
          "full_epoch": not max_steps or max_steps >= steps_per_epoch,
          "num_train": data.num_train, "s": med,
          "ratio": float(np.median(np.asarray(times["trainer"]) / np.asarray(times["pytorch"]))),
          "repeats": repeats}


# ---------------------------------------------------------------------------------------------
# Report


def versions(torch) -> dict:
  # pylint: disable=import-outside-toplevel
  import flax
  import jax
  import jaxlib
  return {"torch": torch.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "numpy": np.__version__,
          "python": platform.python_version()}


def report(args, argv, torch, oo, step_rows, epoch_rows, loads, total_s,
           partial: bool = False) -> str:
  v = versions(torch)
  cmd = "python benchmarks/peer_pytorch.py" + ("" if not argv else " " + shlex.join(argv))
  load_txt = "; ".join(f"{when}: {a:.2f} {b:.2f} {c:.2f}" for when, (a, b, c) in loads)
  lines = [
      "# Trainer vs PyTorch on the same CPU (issue 21)", "",
      f"Command: `{cmd}`", "",
      f"Machine: {oo.cpu_model()}, {os.cpu_count()} cores. Versions: torch {v['torch']}, "
      f"jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, numpy {v['numpy']}, "
      f"Python {v['python']}.", "",
      f"Threads: torch intra-op {torch.get_num_threads()}, inter-op "
      f"{torch.get_num_interop_threads()} (`torch.set_num_threads({args.torch_threads})`); XLA:CPU "
      f"its own pool; `XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}`. oneDNN (mkldnn) "
      f"available: {torch.backends.mkldnn.is_available()}.", "",
      f"Load average (1/5/15 min, {os.cpu_count()} cores): {load_txt}.",
      "**Measured while the machine was loaded (indicative; rerun on a quiet machine).** "
      "The sides are interleaved, so load affects both alike: read the ratios first." if
      max(l[1][0] for l in loads) > 0.5 * (os.cpu_count() or 1) else
      "The machine looked quiet (1-min load ≤ half the cores).", "",
      f"## Training step, batch {args.batch_size}, float32, median of {args.repeats} "
      "interleaved repetitions", "",
      "Same network both sides (parameter counts checked equal); PyTorch: channels_last, "
      "oneDNN, `torch.optim.SGD` lr 0.1 Nesterov 0.9 wd 1e-3; trainer: `train.steps.train_step` "
      "(SGD = the same optimizer in optax; SA = `optax_bm.scale_amended_sgd`, paper settings). "
      "Ratios are medians of the per-repetition ratios.", "",
      "| model | width | params | PyTorch ms/step | PyTorch img/s | trainer SGD ms/step | "
      "trainer SGD img/s | trainer SA ms/step | trainer SGD / PyTorch | trainer SA / PyTorch | "
      "SA / SGD |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in step_rows:
    ms, ips = r["ms"], r["img_s"]
    lines.append(
        f"| {r['model']} | {width_label(r['width'])} | {r['params']['pytorch']:,} | "
        f"{ms['pytorch']:.1f} | {ips['pytorch']:.0f} | {ms['sgd']:.1f} | {ips['sgd']:.0f} | "
        f"{ms['scale_amended']:.1f} | {r['sgd_vs_torch']:.2f}× | {r['sa_vs_torch']:.2f}× | "
        f"{r['sa_vs_sgd']:.3f} |")
  if args.skipped:
    lines += ["", "Skipped (below the trainer's minimum of 4 channels): " + "; ".join(args.skipped) + "."]
  lines += ["", "Trainer side: " + "; ".join(sorted({f"{r['model']}: {r['source']}" for r in step_rows})) + "."]
  lines += ["", "Steps per sample (k): " + "; ".join(
      f"{r['model']} w{width_label(r['width'])} " + ", ".join(f"{n} {k}" for n, k in r["k"].items())
      for r in step_rows) + "."]
  if epoch_rows:
    lines += ["", f"## Epoch on CIFAR-10 (SGD, batch {args.batch_size}), median of "
              f"{args.epoch_repeats} interleaved epoch(s) per side", "",
              "Trainer: `train.steps.EpochRunner` (device-resident data, on-device augmentation, "
              "one step per call). PyTorch: a plain loop, `randperm` order, 4-pixel zero-pad "
              "random crop + horizontal flip on uint8 tensors, normalization, "
              "`torch.optim.SGD` Nesterov; no DataLoader workers.", "",
              "| model | width | steps timed | PyTorch s | trainer s | trainer / PyTorch | "
              "PyTorch img/s | trainer img/s |", "|---|---|---|---|---|---|---|---|"]
    for r in epoch_rows:
      n_img = r["steps"] * r["batch"]
      lines.append(
          f"| {r['model']} | {width_label(r['width'])} | {r['steps']}"
          f"{' (whole epoch)' if r['full_epoch'] else ' (part of an epoch)'} | "
          f"{r['s']['pytorch']:.1f} | {r['s']['trainer']:.1f} | {r['ratio']:.2f}× | "
          f"{n_img / r['s']['pytorch']:.0f} | {n_img / r['s']['trainer']:.0f} |")
  lines += ["", f"Total {total_s:.0f} s." + (" **Partial: the run had not finished when this "
                                               "was written.**" if partial else ""), ""]
  return "\n".join(lines)


def write_atomic(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = resolve(parse_args(argv))
    torch = import_torch()
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.xla_default_scheduler:
    from train import cli  # pylint: disable=import-outside-toplevel
    cli.set_cpu_xla_flags()  # the trainer's flags, before the first JAX computation
  from benchmarks import optimizer_overhead as oo  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.torch_threads)
  t_start = time.perf_counter()
  loads = [("at start", os.getloadavg())]
  print(f"# peer_pytorch{' --quick' if args.quick else ''}")
  print(oo.machine_line())
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        + oo.load_line("at start"), flush=True)
  step_rows, epoch_rows = [], []
  for w, m in args.combos:
    try:
      step_rows.append(bench_step(torch, oo, m, w, args.batch_size, args.repeats,
                                  args.sample_seconds))
    except AssertionError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    r = step_rows[-1]
    write_atomic(pathlib.Path(args.out), report(  # partial results survive an interruption
        args, argv, torch, oo, step_rows, [], loads + [("now", os.getloadavg())],
        time.perf_counter() - t_start, partial=True))
    print(f"  {m} w{width_label(w)}: PyTorch {r['ms']['pytorch']:.1f} ms "
          f"({r['img_s']['pytorch']:.0f} img/s), trainer SGD {r['ms']['sgd']:.1f} ms "
          f"({r['sgd_vs_torch']:.2f}×), SA {r['ms']['scale_amended']:.1f} ms "
          f"(SA/SGD {r['sa_vs_sgd']:.3f}); {oo.load_line('now')}", flush=True)
  loads.append(("after the steps", os.getloadavg()))
  if args.epoch:
    for w, m in args.combos:
      epoch_rows.append(bench_epoch(torch, m, w, args.batch_size, args.data_path,
                                    args.epoch_repeats, args.epoch_steps))
      r = epoch_rows[-1]
      print(f"  epoch {m} w{width_label(w)}: PyTorch {r['s']['pytorch']:.1f} s, trainer "
            f"{r['s']['trainer']:.1f} s ({r['ratio']:.2f}×) over {r['steps']} steps", flush=True)
    loads.append(("after the epochs", os.getloadavg()))
  text = report(args, argv, torch, oo, step_rows, epoch_rows, loads,
                time.perf_counter() - t_start)
  print()
  print(text)
  write_atomic(pathlib.Path(args.out), text)
  print(f"written: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
