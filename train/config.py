"""The run's configuration: what determines a result, its defaults, and its validation.

:class:`Config` is what a work directory stores as ``config.json``; :func:`validate_config`
refuses a bad one with one :class:`UsageError` line naming the flag; :func:`config_from_args`
turns the command line into one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

from train import models


OPTIMIZERS = ("sgd", "lars", "lsalr", "scale_amended")
# Supplement §D / docs/method.md#4-the-optimizers-of-table-1: (learning rate, weight decay) per optimizer.
PAPER_SETTINGS = {
    "sgd": (0.1, 1e-3),
    "lars": (2.0, 1e-3),
    "lsalr": (0.1, 1e-3),
    "scale_amended": (0.1, 5e-3),
}
# The defaults: the learning rate chosen on a held-out validation split of CIFAR-10
# (train/results/ablation_cifar10/ablation.md: VGG11-BN width 1/8, 10-epoch screen, SGD and
# scale-amended confirmed over 3 seeds × 30 epochs; LARS screened only). LSALR was not screened
# on CIFAR-10, so it keeps the paper's. Weight decay is the paper's for all four.
DEFAULT_SETTINGS = {
    "sgd": (0.1, 1e-3),  # the paper's value won the screen
    "lars": (4.0, 1e-3),  # screen: 76.76 % val at 4 vs 73.70 % at the paper's 2
    "lsalr": (0.1, 1e-3),  # not screened: the paper's
    "scale_amended": (0.03, 5e-3),  # screen: 76.38 % val at 0.03, 73.64 % at the paper's 0.1
}
# Per model family: the CIFAR ResNets' SGD weight decay is He et al.'s (2016, §4.2: momentum
# 0.9, lr 0.1, wd 1e-4, batch 128). No value is published for the other optimizers on ResNets:
# they keep DEFAULT_SETTINGS' weight decay.
RESNET_WEIGHT_DECAY = {"sgd": 1e-4}
# Scale-amended SGD's learning rate on the CIFAR ResNets, chosen on validation
# (train/results/ablation_cifar10_resnet20: ResNet-20 width 1/4, 10-epoch screen, 3 seeds × 30
# epochs; 62.50 % val at 0.1 against 55.88 % at the VGGs' 0.03). SGD keeps He et al.'s 0.1.
RESNET_LEARNING_RATE = {"scale_amended": 0.1}
LARS_TRUST_COEFFICIENT = 1e-3
# Fewest channels a convolution may be scaled down to by --width (round(c · width)): below
# this a VGG is a handful of parameters that cannot learn CIFAR (--width 0.001 gave VGG11
# 126 parameters). Width 1/16, the narrowest in the tests, gives VGG's first layer 4.
MIN_CHANNELS = 4
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class UsageError(ValueError):
  """Bad command-line input; reported as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run's result (stored as ``config.json``)."""

  dataset: str = "cifar10"
  model: str = "vgg11"
  optimizer: str = "sgd"
  epochs: int = 200
  batch_size: int = 128
  lr: Optional[float] = None  # None: DEFAULT_SETTINGS' (validation-chosen) for the optimizer
  weight_decay: Optional[float] = None  # None: the paper's value for the optimizer
  momentum: float = 0.9
  nesterov: bool = True
  schedule: str = "step"  # step: ×0.1 at 50% and 75% of training; cosine: to 0; constant
  width: float = 1.0
  compute_dtype: str = "float32"
  seed: int = 0
  data_dir: Optional[str] = None
  train_subset: Optional[int] = None  # use only the first N training images
  test_subset: Optional[int] = None  # evaluate on the first N test images only
  allow_subset: bool = False  # accept known CIFAR subsets (cifar10-mini); "sample" implies it
  val_split: int = 0  # hold out the last N training images (never trained on) for validation
  # Scale-amended SGD's reading of the paper (docs/method.md#6-open-points-and-what-decided-them); None: the library's default. Only
  # used (and recorded) for optimizer="scale_amended".
  sa_pooling: Optional[str] = None  # optax_bm.annotate(pooling=...)
  sa_scale_others: Optional[bool] = None  # scale_amended_sgd(scale_others=...)
  sa_gamma_aware: Optional[bool] = None  # scale_amended_sgd(gamma_aware=...)
  sa_decay_before_scaling: Optional[bool] = None  # scale_amended_sgd(decay_before_scaling=...)
  # scale_amended_sgd(input_scale=...): a residual unit's input moment. Recorded only for
  # ResNets (a VGG has no residual unit), so VGG configs stay as they were.
  sa_input_scale: Optional[str] = None
  # Where the step schedule's two decays fall: None, at the epochs nearest 50 % and 75 % of
  # training (every run made before this field existed); "steps", at 50 % and 75 % of the
  # steps. resolved() picks "steps" only for runs too short for two epoch-aligned decays
  # (3 epochs: both round to epoch 2), so longer runs keep their schedule and config.
  decay_boundaries: Optional[str] = None

  def resolved(self) -> "Config":
    """Fills lr / weight decay with :data:`DEFAULT_SETTINGS`, picks the step schedule's
    ``decay_boundaries`` and makes data_dir absolute (config.json records it relative to the
    repository where it lies inside it or in ../shared)."""
    if self.optimizer not in DEFAULT_SETTINGS:
      raise UsageError(f"unknown optimizer {self.optimizer!r}; choose from "
                       f"{', '.join(OPTIMIZERS)}")
    lr, wd = DEFAULT_SETTINGS[self.optimizer]
    if self.model in models.RESNETS:
      wd = RESNET_WEIGHT_DECAY.get(self.optimizer, wd)
      lr = RESNET_LEARNING_RATE.get(self.optimizer, lr)
    boundaries = self.decay_boundaries
    if (boundaries is None and self.schedule == "step"
        and len(epoch_aligned_decays(self.epochs)) < 2):
      boundaries = "steps"
    data_dir = self.data_dir
    if data_dir not in (None, "sample"):
      data_dir = os.path.abspath(os.path.expanduser(data_dir))
    reading = {}
    for field, default in sa_reading_defaults().items():
      value = getattr(self, field)
      reading[field] = ((default if value is None else value)
                        if self.optimizer == "scale_amended" else None)
    if self.model not in models.RESNETS:
      reading["sa_input_scale"] = None
    return dataclasses.replace(
        self, lr=float(lr if self.lr is None else self.lr),
        weight_decay=float(wd if self.weight_decay is None else self.weight_decay),
        data_dir=data_dir, decay_boundaries=boundaries, **reading)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def epoch_aligned_decays(epochs: int) -> list:
  """The epochs (rounded half to even) nearest 50 % and 75 % of training where the step
  schedule decays, those inside training only: 10 epochs -> [5, 8], 30 -> [15, 22],
  200 -> [100, 150], 3 -> [2] (both round to 2)."""
  return sorted({int(round(f * epochs)) for f in (0.5, 0.75)} & set(range(1, epochs)))


def narrowest_layer(model: str, width: float) -> tuple[int, int]:
  """(channels at width 1, channels at ``width``) of the model's narrowest convolution."""
  if model in models.RESNETS:
    c = min(models.RESNET_STAGES)
  else:
    c = min(int(x) for x in models.CFGS[model] if x != "M")
  return c, models.scaled_channels(c, width)


def sa_reading_defaults() -> dict:
  """The library's default reading of the paper (docs/method.md#6-open-points-and-what-decided-them), as :class:`Config` fields."""
  import inspect  # pylint: disable=import-outside-toplevel
  import optax_bm  # pylint: disable=import-outside-toplevel
  ann = inspect.signature(optax_bm.annotate).parameters
  sgd = inspect.signature(optax_bm.scale_amended_sgd).parameters
  return {"sa_pooling": ann["pooling"].default,
          "sa_scale_others": sgd["scale_others"].default,
          "sa_gamma_aware": sgd["gamma_aware"].default,
          "sa_decay_before_scaling": sgd["decay_before_scaling"].default,
          "sa_input_scale": sgd["input_scale"].default}


def validate_config(config: Config) -> None:
  if config.model not in models.MODELS:
    raise UsageError(f"unknown model {config.model!r}; choose from {', '.join(models.MODELS)}")
  if config.dataset not in NUM_CLASSES:
    raise UsageError(f"unknown dataset {config.dataset!r}; choose cifar10 or cifar100")
  if config.compute_dtype not in DTYPES:
    raise UsageError(f"unknown compute dtype {config.compute_dtype!r}")
  for name in ("epochs", "batch_size"):
    if getattr(config, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
  if not (math.isfinite(config.width) and config.width > 0):
    raise UsageError(f"--width must be a positive number (got {config.width})")
  full, scaled = narrowest_layer(config.model, config.width)
  if scaled < MIN_CHANNELS:
    raise UsageError(
        f"--width {config.width:g} leaves {config.model}'s narrowest convolution {scaled} "
        f"channel(s) (of {full}); at least {MIN_CHANNELS} are needed for a network that can "
        f"learn: use --width {(MIN_CHANNELS - 0.5) / full:.3g} or more")
  if config.sa_input_scale not in (None, "propagated", "unit"):
    raise UsageError(f"--sa-input-scale must be propagated or unit (got "
                     f"{config.sa_input_scale!r})")
  if (config.model in models.RESNETS and config.optimizer == "scale_amended"
      and config.sa_pooling not in (None, "before")):
    raise UsageError(f"--sa-pooling {config.sa_pooling} is not implemented for ResNets "
                     f"({config.model}); use --sa-pooling before")
  if config.decay_boundaries not in (None, "steps"):
    raise UsageError(f"unknown decay_boundaries {config.decay_boundaries!r}: None or 'steps'")
  if not (math.isfinite(config.lr) and config.lr > 0):
    raise UsageError(f"--lr must be a positive number (got {config.lr})")
  if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
    raise UsageError(f"--weight-decay must be a number >= 0 (got {config.weight_decay})")
  if not (math.isfinite(config.momentum) and 0 <= config.momentum < 1):
    raise UsageError(f"--momentum must be in [0, 1) (got {config.momentum})")
  for name in ("train_subset", "test_subset"):
    value = getattr(config, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {value}; omit it "
                       "for all images)")
  if config.val_split < 0:
    raise UsageError(f"--val-split must be >= 0 (got {config.val_split})")
  n = jax.device_count()
  if config.batch_size % n:
    raise UsageError(f"batch size {config.batch_size} is not divisible by the device count "
                     f"{n}; use a multiple of {n}")


def config_from_args(args: argparse.Namespace) -> Config:
  return Config(dataset=args.dataset, model=args.model, optimizer=args.optimizer,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                weight_decay=args.weight_decay, momentum=args.momentum,
                schedule=args.schedule, width=args.width, compute_dtype=args.compute_dtype,
                seed=args.seed, data_dir=args.data_dir, allow_subset=args.allow_subset,
                train_subset=args.train_subset,
                test_subset=args.test_subset, val_split=args.val_split,
                sa_pooling=args.sa_pooling,
                sa_scale_others=None if args.sa_others is None else args.sa_others == "scaled",
                sa_gamma_aware=None if args.sa_gamma is None else args.sa_gamma == "aware",
                sa_decay_before_scaling=(None if args.sa_decay is None
                                         else args.sa_decay == "before"),
                sa_input_scale=args.sa_input_scale)
