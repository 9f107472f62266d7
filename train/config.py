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
# Supplement §D / SPEC §4: (learning rate, weight decay) per optimizer.
PAPER_SETTINGS = {
    "sgd": (0.1, 1e-3),
    "lars": (2.0, 1e-3),
    "lsalr": (0.1, 1e-3),
    "scale_amended": (0.1, 5e-3),
}
LARS_TRUST_COEFFICIENT = 1e-3
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
  lr: Optional[float] = None  # None: the paper's value for the optimizer
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
  # Scale-amended SGD's reading of the paper (SPEC §6); None: the library's default. Only
  # used (and recorded) for optimizer="scale_amended".
  sa_pooling: Optional[str] = None  # optax_bm.annotate(pooling=...)
  sa_scale_others: Optional[bool] = None  # scale_amended_sgd(scale_others=...)
  sa_gamma_aware: Optional[bool] = None  # scale_amended_sgd(gamma_aware=...)
  sa_decay_before_scaling: Optional[bool] = None  # scale_amended_sgd(decay_before_scaling=...)

  def resolved(self) -> "Config":
    """Fills lr / weight decay with the paper's values and makes data_dir absolute (config.json
    records it relative to the repository where it lies inside it or in ../shared)."""
    if self.optimizer not in PAPER_SETTINGS:
      raise UsageError(f"unknown optimizer {self.optimizer!r}; choose from "
                       f"{', '.join(OPTIMIZERS)}")
    lr, wd = PAPER_SETTINGS[self.optimizer]
    data_dir = self.data_dir
    if data_dir not in (None, "sample"):
      data_dir = os.path.abspath(os.path.expanduser(data_dir))
    reading = {}
    for field, default in sa_reading_defaults().items():
      value = getattr(self, field)
      reading[field] = ((default if value is None else value)
                        if self.optimizer == "scale_amended" else None)
    return dataclasses.replace(
        self, lr=float(lr if self.lr is None else self.lr),
        weight_decay=float(wd if self.weight_decay is None else self.weight_decay),
        data_dir=data_dir, **reading)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def sa_reading_defaults() -> dict:
  """The library's default reading of the paper (SPEC §6), as :class:`Config` fields."""
  import inspect  # pylint: disable=import-outside-toplevel
  import optax_bm  # pylint: disable=import-outside-toplevel
  ann = inspect.signature(optax_bm.annotate).parameters
  sgd = inspect.signature(optax_bm.scale_amended_sgd).parameters
  return {"sa_pooling": ann["pooling"].default,
          "sa_scale_others": sgd["scale_others"].default,
          "sa_gamma_aware": sgd["gamma_aware"].default,
          "sa_decay_before_scaling": sgd["decay_before_scaling"].default}


def validate_config(config: Config) -> None:
  if config.model not in models.CFGS:
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
                                         else args.sa_decay == "before"))
