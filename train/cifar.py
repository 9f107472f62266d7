"""Trains VGG-BN on CIFAR-10/100 with SGD, LARS, LSALR or scale-amended SGD (Table 1).

In the shape of Flax's examples (``create_train_state``, ``train_step``, ``eval_step``,
``train_and_evaluate(config, workdir)``), with these design choices:

* **Functional NNX.** The model is split once into a static graph definition and pure pytrees
  (``params``, ``batch_stats``); every step merges them back (``nnx.merge``) inside the traced
  function. The train state is a plain dict of arrays, so it goes straight through
  ``jax.jit``/``lax.scan``, buffer donation, sharding and orbax.
* **Device-resident data, no host sync inside an epoch.** The whole (uint8) dataset lives on
  the devices for the run. The epoch's permutation and augmentation keys come from
  (seed, epoch) on the device; each step gathers its batch, augments it (random crop + flip,
  keyed by (seed, epoch, step)), normalizes and trains; the state is donated and the metrics
  are summed on the device and read once per epoch. ``--steps-per-call 0`` runs a whole epoch
  as one ``lax.scan`` (the default on GPU/TPU); on CPU the default is one jitted call per
  step, dispatched asynchronously, because XLA:CPU runs this network several times slower
  inside a loop (see :class:`EpochRunner`).
* **Data parallel on all devices.** A 1-D mesh ``("data",)`` over every device of every
  process; batches are sharded along it, parameters and optimizer state replicated. BatchNorm
  statistics and gradients are over the global batch (XLA inserts the all-reduces). The
  dataset itself is replicated (CIFAR is 180 MB as uint8) so shuffling is global and the
  result does not depend on the number of devices or hosts; on several hosts each process
  loads its own copy and feeds it with ``jax.make_array_from_process_local_data``.
* **Work directory.** ``config.json`` (a rerun with another config is refused),
  ``checkpoints/`` (orbax, one per epoch, written to a temporary directory and renamed), and
  ``metrics.jsonl``. The metrics history is saved *inside* each checkpoint and
  ``metrics.jsonl`` is rewritten from it (temp file + ``os.replace``) after each checkpoint
  and on resume, so after any crash it holds exactly the checkpointed epochs.

Exit status: 0 on success, 1 for unusable data (``train.data.DataError``), 2 for bad
command-line input (argparse's own errors included), 3 for a run whose training loss turned
non-finite (:class:`Diverged`), each reported as one ``error:`` line.

Usage: ``python train/cifar.py --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

try:  # Run as a script (python train/cifar.py) or as a module (python -m train.cifar).
  from train import models
except ImportError:  # pragma: no cover
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from train import models
from train import data as data_lib

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
DATA_AXIS = "data"

# XLA:CPU's concurrency-optimized scheduler orders independent ops so they can run at the same
# time; on a few cores two YNNPACK convolutions then contend for the same cores and caches.
# Turned off, a full-width VGG11 step ran 4-8 % faster here and VGG16 the same
# (benchmarks/README.md). Only XLA:CPU reads this flag: GPU and TPU compilations are unaffected.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


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


# --------------------------------------------------------------------------------------------
# Model, optimizer, state


class Setup(NamedTuple):
  """The static half of a run: graph definitions, optimizer, schedule, compute dtype."""

  graphdef: Any  # train mode (batch statistics)
  eval_graphdef: Any  # eval mode (running statistics)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  dtype: Any
  # --log-blocks: paths of every block's kernel (block order), and a params -> per-block
  # factor function (scale-amended only); empty / None when not logging.
  block_kernels: tuple = ()
  block_factors: Optional[Callable] = None


def create_model(config: Config, num_classes: int, rngs: nnx.Rngs,
                 small_map_conv: Optional[bool] = None) -> models.VGG:
  return models.vgg(config.model, num_classes, width=config.width,
                    dtype=DTYPES[config.compute_dtype], rngs=rngs,
                    small_map_conv=small_map_conv)


@functools.lru_cache(maxsize=None)
def _init_fn(model: str, num_classes: int, width: float, compute_dtype: str,
             small_map_conv: Optional[bool]):
  """A jitted ``key -> model``: initialized in one compiled call (eagerly, every initializer
  op compiles on its own: ~10 s for VGG11 on a CPU), compiled once per architecture."""
  return nnx.jit(lambda key: models.vgg(model, num_classes, width=width,
                                        dtype=DTYPES[compute_dtype], rngs=nnx.Rngs(key),
                                        small_map_conv=small_map_conv))


def create_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """Step decay ×0.1 at 50% and 75% of the epochs (epoch-aligned), cosine decay to 0, or
  constant (the only one whose trained epochs stay the same when ``epochs`` grows)."""
  total = config.epochs * steps_per_epoch
  if config.schedule == "step":
    bounds = sorted({int(round(f * config.epochs)) * steps_per_epoch for f in (0.5, 0.75)})
    return optax.piecewise_constant_schedule(config.lr, {b: 0.1 for b in bounds if 0 < b})
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, max(total, 1))
  if config.schedule == "constant":
    return optax.constant_schedule(config.lr)
  raise UsageError(f"unknown schedule {config.schedule!r}; choose step, cosine or constant")


def create_optimizer(config: Config, schedule: optax.Schedule,
                     specs: Any = None) -> optax.GradientTransformation:
  """The four optimizers of Table 1 (weight decay added to the gradient before any scaling)."""
  wd, mom, nest = config.weight_decay, config.momentum, config.nesterov
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.sgd(schedule, momentum=mom, nesterov=nest))
  if config.optimizer == "lars":
    return optax.lars(schedule, weight_decay=wd, trust_coefficient=LARS_TRUST_COEFFICIENT,
                      momentum=mom, nesterov=nest)
  import optax_bm  # pylint: disable=import-outside-toplevel
  if config.optimizer == "lsalr":
    return optax_bm.lsalr(schedule, weight_decay=wd, momentum=mom, nesterov=nest)
  if config.optimizer == "scale_amended":
    if specs is None:
      raise ValueError("scale_amended needs the model's spec tree (optax_bm.annotate)")
    return optax_bm.scale_amended_sgd(
        schedule, specs, momentum=mom, nesterov=nest, weight_decay=wd,
        scale_others=config.sa_scale_others, gamma_aware=config.sa_gamma_aware,
        decay_before_scaling=config.sa_decay_before_scaling)
  raise UsageError(f"unknown optimizer {config.optimizer!r}; choose from "
                   f"{', '.join(OPTIMIZERS)}")


def create_train_state(config: Config, num_classes: int, steps_per_epoch: int, *,
                       small_map_conv: Optional[bool] = None,
                       log_blocks: bool = False) -> tuple[Setup, dict]:
  """Builds the model and optimizer; returns the static setup and the (host) train state.

  The state is ``{"step", "params", "batch_stats", "opt_state"}`` (plain pytrees of arrays,
  parameter paths as in ``nnx.state(model, nnx.Param)``), on the default device; see
  :func:`replicate` to place it on a mesh. ``config`` may leave lr / weight decay unset (the
  paper's values are filled in). ``small_map_conv`` is :func:`train.models.vgg`'s (default:
  on the CPU backend only); an implementation choice, not part of the config.
  """
  config = config.resolved()
  model = _init_fn(config.model, num_classes, config.width, config.compute_dtype,
                   small_map_conv)(jax.random.key(config.seed))
  specs = None
  if config.optimizer == "scale_amended" or log_blocks:
    import optax_bm  # pylint: disable=import-outside-toplevel
    specs = optax_bm.annotate(model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
                              pooling=config.sa_pooling or "before")
  schedule = create_schedule(config, steps_per_epoch)
  tx = create_optimizer(config, schedule, specs)
  block_kernels, block_factors = (), None
  if log_blocks:
    block_kernels, block_factors = _block_logging(config, specs)
  model.train()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
  params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
           "opt_state": jax.jit(tx.init)(params)}
  return Setup(graphdef, eval_graphdef, tx, schedule, DTYPES[config.compute_dtype],
               block_kernels, block_factors), state


def _block_logging(config: Config, specs) -> tuple:
  """Kernel paths in block order, and (scale-amended) a params -> [factor per block] function."""
  import optax_bm  # pylint: disable=import-outside-toplevel
  from optax_bm import specs as specs_lib  # pylint: disable=import-outside-toplevel
  flat = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, optax_bm.LayerSpec))[0]
  kernels = sorted((s.block, specs_lib.path_str(p)) for p, s in flat
                   if isinstance(s, optax_bm.LayerSpec) and s.is_kernel)
  paths = tuple(p for _, p in kernels)
  if config.optimizer != "scale_amended":
    return paths, None

  def factors(params):
    scales = optax_bm.block_scales(specs, params, scale_others=config.sa_scale_others,
                                   gamma_aware=config.sa_gamma_aware)
    return jnp.stack([jnp.asarray(x, jnp.float32)
                      for x in _leaves_at(scales, paths)])

  return paths, factors


def _leaves_at(tree, paths) -> list:
  from optax_bm import specs as specs_lib  # pylint: disable=import-outside-toplevel
  return specs_lib.leaves_at(tree, paths)


def block_statistics(setup: Setup, params) -> dict:
  """Per block (host side, end of an epoch): kernel norm ``‖W_b‖`` and BatchNorm ``E[γ²]``."""
  kernels = _leaves_at(params, setup.block_kernels)
  gammas = []
  for path in setup.block_kernels:
    prefix = path.rsplit("/", 2)[0]  # blocks/3/conv/kernel -> blocks/3
    try:
      (g,) = _leaves_at(params, [f"{prefix}/bn/scale"])
      gammas.append(float(np.mean(np.square(np.asarray(g, np.float64)))))
    except ValueError:
      gammas.append(None)  # no BatchNorm (the classifier)
  return {"w_norm": [float(np.linalg.norm(np.asarray(k, np.float64))) for k in kernels],
          "gamma2": gammas}


# --------------------------------------------------------------------------------------------
# Steps


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: dict, images: jax.Array, labels: jax.Array, *,
               setup: Setup) -> tuple[dict, dict]:
  """One optimizer step on a (normalized) batch; returns the new state and metric sums.

  Under ``jax.jit`` with the batch sharded over a mesh this is data-parallel training: the
  mean loss, its gradient and BatchNorm's statistics are over the global batch.
  """

  def loss_fn(params):
    model = nnx.merge(setup.graphdef, params, state["batch_stats"])
    logits = model(images)
    loss = cross_entropy(logits, labels).mean()
    return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  n = labels.shape[0]
  metrics = {"loss": loss * n,
             "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
             "count": jnp.asarray(n, jnp.float32)}
  if setup.block_kernels:  # --log-blocks: effective angular step ‖ΔW_b‖ / ‖W_b‖ per block
    w = _leaves_at(state["params"], setup.block_kernels)
    u = _leaves_at(updates, setup.block_kernels)
    metrics["angular_step"] = jnp.stack(
        [jnp.linalg.norm(ui.astype(jnp.float32)) / jnp.linalg.norm(wi.astype(jnp.float32))
         for wi, ui in zip(w, u)])
    if setup.block_factors is not None:
      metrics["factor"] = setup.block_factors(state["params"])
  return {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
          "opt_state": opt_state}, metrics


def eval_step(state: dict, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              setup: Setup) -> dict:
  """Metric sums over the examples where ``mask`` is true, with BatchNorm's running averages."""
  model = nnx.merge(setup.eval_graphdef, state["params"], state["batch_stats"])
  logits = model(images)
  m = mask.astype(jnp.float32)
  return {"loss": jnp.sum(cross_entropy(logits, labels) * m),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * m),
          "count": jnp.sum(m)}


def _zeros_metrics(setup: Optional[Setup] = None):
  """Zero metric sums: (loss, correct, count), plus the per-block sums of --log-blocks."""
  out = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
  if setup is not None and setup.block_kernels:
    out["angular_step"] = jnp.zeros((len(setup.block_kernels),), jnp.float32)
    if setup.block_factors is not None:
      out["factor"] = jnp.zeros((len(setup.block_kernels),), jnp.float32)
  return out


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
  """Places a pytree (identical on every process) replicated on the mesh."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def make_train_step(setup: Setup, mesh: Mesh, donate: bool = False) -> Callable:
  """``train_step`` jitted for the mesh: batch sharded, state replicated."""
  repl, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(functools.partial(train_step, setup=setup),
                 in_shardings=(repl, batch, batch), out_shardings=(repl, repl),
                 donate_argnums=(0,) if donate else ())


def make_epoch_batches(config: Config, mesh: Mesh, num_train: int):
  """A jitted ``epoch -> (batch indices [steps, B], augmentation key)``, from (seed, epoch).

  The permutation is ``data.epoch_permutation(seed, epoch, n)`` split into batches (the last
  ``n mod B`` examples dropped); the key is ``data.epoch_keys(seed, epoch)[1]``.
  """

  def fn(epoch):
    _, augment_key = data_lib.epoch_keys(config.seed, epoch)
    perm = data_lib.epoch_permutation(config.seed, epoch, num_train)
    return data_lib.batch_indices(perm.astype(jnp.int32), config.batch_size), augment_key

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def _scan_or_call(body, carry, first, num_steps):
  """``carry = body(carry, first + j)`` for ``j < num_steps``: a ``lax.scan``, or one call."""
  if num_steps == 1:
    return body(carry, first)
  return jax.lax.scan(lambda c, j: (body(c, first + j), None), carry,
                      jnp.arange(num_steps, dtype=jnp.int32))[0]


def make_train_steps(setup: Setup, mesh: Mesh, config: Config, num_steps: int):
  """A jitted run of ``num_steps`` training steps from the device-resident training set.

  ``(state, sums, images, labels, batches, augment_key, first) -> (state, sums)``: step
  ``i = first .. first + num_steps - 1`` gathers ``images[batches[i]]`` (uint8, replicated
  dataset), augments it with ``fold_in(augment_key, i)``, normalizes, shards it over the
  mesh's data axis and calls :func:`train_step`; metric sums accumulate on the device. The
  state and sums are donated. ``num_steps > 1`` is a ``lax.scan`` (one call per epoch when
  ``num_steps`` is the epoch's length).
  """
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

  def fn(state, sums, images, labels, batches, augment_key, first):

    def one_step(carry, i):
      state, sums = carry
      idx = jax.lax.with_sharding_constraint(batches[i], batch_sharding)
      x = jax.lax.with_sharding_constraint(jnp.take(images, idx, axis=0), batch_sharding)
      y = jax.lax.with_sharding_constraint(jnp.take(labels, idx, axis=0), batch_sharding)
      x = data_lib.augment(jax.random.fold_in(augment_key, i), x)
      x = jax.lax.with_sharding_constraint(
          data_lib.normalize(x, config.dataset, setup.dtype), batch_sharding)
      state, metrics = train_step(state, x, y, setup=setup)
      return state, jax.tree.map(jnp.add, sums, metrics)

    return _scan_or_call(one_step, (state, sums), first, num_steps)

  repl = NamedSharding(mesh, P())
  return jax.jit(fn, out_shardings=(repl, repl), donate_argnums=(0, 1))


def make_eval_steps(setup: Setup, mesh: Mesh, eval_batch_size: int, dataset: str,
                    num_steps: int):
  """A jitted run of ``num_steps`` evaluation batches of a padded, device-resident test set.

  ``(sums, state, images, labels, mask, first) -> sums``, batch ``i`` being rows
  ``i·E .. (i+1)·E`` (``E = eval_batch_size``); padding rows have ``mask`` false.
  """
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

  def fn(sums, state, images, labels, mask, first):

    def one_batch(sums, i):
      def get(a):
        a = jax.lax.dynamic_slice_in_dim(a, i * eval_batch_size, eval_batch_size)
        return jax.lax.with_sharding_constraint(a, batch_sharding)

      x = data_lib.normalize(get(images), dataset, setup.dtype)
      metrics = eval_step(state, x, get(labels), get(mask), setup=setup)
      return jax.tree.map(jnp.add, sums, metrics)

    return _scan_or_call(one_batch, sums, first, num_steps)

  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()), donate_argnums=(0,))


class EpochRunner:
  """Runs training epochs and test evaluations with ``steps_per_call`` steps per jitted call.

  ``steps_per_call=0`` puts a whole epoch (and the whole evaluation) into one call (a
  ``lax.scan``): the best choice on GPUs/TPUs. On XLA:CPU a convolution network inside a
  ``while`` loop runs many times slower than the same step called from Python (measured
  here: VGG11 at width 1/4 on the sample, 72 images/s in an epoch scan vs 1005 per call):
  inside the loop body XLA:CPU leaves the first convolution and most backward convolutions
  (12 of VGG11's 17) to its generic loop emitter instead of YNNPACK. So the default there
  is one step per call. Either way nothing syncs with the host inside an
  epoch: calls are dispatched asynchronously and the metric sums stay on the device until
  the epoch's end. All functions are compiled ahead of time (:meth:`compile`).
  """

  def __init__(self, setup: Setup, mesh: Mesh, config: Config, data: "_Data",
               steps_per_epoch: int, eval_batch_size: int, steps_per_call: int):
    self.data, self.mesh, self.setup = data, mesh, setup
    self.steps_per_epoch = steps_per_epoch
    self.eval_batch_size = eval_batch_size
    # Evaluation splits: (images, labels, mask) padded to eval_batch_size; "val" if held out.
    self.splits = {"test": (data.test_images, data.test_labels, data.test_mask)}
    if data.num_val:
      self.splits["val"] = (data.val_images, data.val_labels, data.val_mask)
    self.eval_steps = data.test_images.shape[0] // eval_batch_size
    self._scalars: dict = {}
    self.batches_fn = make_epoch_batches(config, mesh, data.num_train)
    self.train_plan = self._plan(steps_per_epoch, steps_per_call)
    self.eval_plans = {name: self._plan(arrays[0].shape[0] // eval_batch_size, steps_per_call)
                       for name, arrays in self.splits.items()}
    self.train_fns = {k: make_train_steps(setup, mesh, config, k)
                      for k in {k for _, k in self.train_plan}}
    self.eval_fns = {(name, k): make_eval_steps(setup, mesh, eval_batch_size, config.dataset, k)
                     for name, plan in self.eval_plans.items() for k in {k for _, k in plan}}

  @property
  def eval_plan(self) -> list:
    """The test split's evaluation plan ``[(first batch, batches per call), ...]``."""
    return self.eval_plans["test"]

  @staticmethod
  def _plan(total: int, per_call: int) -> list:
    per_call = total if per_call <= 0 else min(per_call, total)
    return [(first, min(per_call, total - first)) for first in range(0, total, per_call)]

  def _scalar(self, v: int) -> jax.Array:
    if v not in self._scalars:  # cached: no host-to-device transfer per step
      self._scalars[v] = replicate(np.int32(v), self.mesh)
    return self._scalars[v]

  def compile(self, state) -> None:
    d = self.data
    self.batches_fn = self.batches_fn.lower(self._scalar(0)).compile()
    batches, key = self.batches_fn(self._scalar(0))
    train_zeros = replicate(jax.device_get(_zeros_metrics(self.setup)), self.mesh)
    zeros = replicate(jax.device_get(_zeros_metrics()), self.mesh)
    for k, f in self.train_fns.items():
      self.train_fns[k] = f.lower(state, train_zeros, d.train_images, d.train_labels, batches,
                                  key, self._scalar(0)).compile()
    for (name, k), f in self.eval_fns.items():
      self.eval_fns[name, k] = f.lower(zeros, state, *self.splits[name],
                                       self._scalar(0)).compile()

  def train_epoch(self, state, epoch: int):
    """Trains one epoch; returns the new state and the metric sums (on the device)."""
    d = self.data
    batches, key = self.batches_fn(self._scalar(epoch))
    sums = replicate(jax.device_get(_zeros_metrics(self.setup)), self.mesh)
    for first, k in self.train_plan:
      state, sums = self.train_fns[k](state, sums, d.train_images, d.train_labels, batches,
                                      key, self._scalar(first))
    return state, sums

  def evaluate(self, state, split: str = "test"):
    """Metric sums over a split ("test" or "val"; on the device), with running averages."""
    sums = replicate(jax.device_get(_zeros_metrics()), self.mesh)
    for first, k in self.eval_plans[split]:
      sums = self.eval_fns[split, k](sums, state, *self.splits[split], self._scalar(first))
    return sums


# --------------------------------------------------------------------------------------------
# Work directory: config, metrics, checkpoints


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# Config fields compared after the data is loaded (data: by identity, not path) or allowed to
# change (epochs: when the trained epochs' schedule stays the same), see train_and_evaluate.
_LATE_FIELDS = ("data_dir", "epochs")


def prepare_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that it can be written (before any data loads)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir}: exists and is not a directory")
  probe = os.path.join(workdir, f".write-test-{os.getpid()}-{jax.process_index()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"--workdir {workdir}: cannot create or write it "
                     f"({e.strerror or type(e).__name__})") from None


def read_stored_config(workdir: str) -> Optional[dict]:
  """The workdir's config.json as stored (with defaults for fields added since), or None."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(f"cannot read {path}: {e}") from None
  if not isinstance(stored, dict):
    raise UsageError(f"cannot read {path}: not a JSON object")
  # A config written before a field existed ran with that field's default.
  return {**{f.name: f.default for f in dataclasses.fields(Config)}, **stored}


def check_config(config: Config, workdir: str) -> Optional[dict]:
  """The stored config if ``workdir`` holds this run; None if none; UsageError if another one.

  ``data_dir`` and ``epochs`` are left to :func:`check_data` and :func:`check_epochs`.
  """
  stored = read_stored_config(workdir)
  if stored is None:
    return None
  new = config.to_json()
  diff = [f"{k}: {stored.get(k)!r} there, {new.get(k)!r} here"
          for k in sorted(set(stored) | set(new)) if k not in _LATE_FIELDS + ("data",)
          and stored.get(k) != new.get(k)]
  if diff:
    raise UsageError(f"workdir {workdir} holds a run with a different config ("
                     + "; ".join(diff) + "); use another --workdir or the same flags")
  return stored


def check_data(stored: dict, config: Config, identity: dict, workdir: str) -> None:
  """Refuses other data than the run's: compared by content checksum, not by path."""
  recorded = stored.get("data")
  if recorded is None:  # written before identities were recorded: compare the paths
    old = stored.get("data_dir")
    old = old if old in (None, "sample") else str(data_lib.resolve_path(old))
    if old != config.data_dir:
      raise UsageError(f"workdir {workdir} holds a run on data_dir {old!r}, not "
                       f"{config.data_dir!r}; use another --workdir or the same data")
    return
  if recorded.get("checksum") != identity["checksum"]:
    raise UsageError(
        f"workdir {workdir} holds a run on other data ({recorded.get('dataset')} "
        f"{recorded.get('kind')}, {recorded.get('train_images')} train / "
        f"{recorded.get('test_images')} test images, checksum {recorded.get('checksum')}) than "
        f"--data-dir gives ({identity['kind']}, {identity['train_images']} / "
        f"{identity['test_images']}, checksum {identity['checksum']}); use another --workdir")


def check_epochs(stored: dict, config: Config, trained: int, steps_per_epoch: int,
                 workdir: str) -> Optional[str]:
  """Whether ``--epochs`` may differ from the stored run's; returns the log line if it does.

  Allowed when the learning rate of every step already trained stays the same under the new
  total (always for ``--schedule constant``; for step decay only before the first boundary
  of both totals; for cosine only before any training), and never below the trained epochs.
  """
  old = int(stored["epochs"])
  if old == config.epochs:
    return None
  if config.epochs < trained:
    raise UsageError(f"workdir {workdir} holds a run already trained {trained} epochs; "
                     f"--epochs {config.epochs} is fewer")
  steps = np.arange(trained * steps_per_epoch)
  before = np.asarray(create_schedule(dataclasses.replace(config, epochs=old),
                                      steps_per_epoch)(steps))
  after = np.asarray(create_schedule(config, steps_per_epoch)(steps))
  if not np.array_equal(before, after):
    k = int(np.argmax(before != after))
    raise UsageError(
        f"workdir {workdir} holds a {config.schedule}-schedule run of {old} epochs, "
        f"{trained} trained; with --epochs {config.epochs} the learning rate of trained epoch "
        f"{k // steps_per_epoch + 1} would be {after[k]:.4g} instead of {before[k]:.4g}, so "
        "the run cannot be extended; use another --workdir (--schedule constant can be "
        "extended)")
  return (f"epochs {old} -> {config.epochs}: the {config.schedule} schedule of the {trained} "
          "trained epochs is unchanged")


def write_config(config: Config, workdir: str, identity: Optional[dict] = None) -> None:
  """Writes config.json (valid JSON only): data_dir relative to the repository where it lies
  inside it or in ../shared (else absolute), and the data's identity."""
  if jax.process_index() == 0:
    record = config.to_json()
    if record["data_dir"] not in (None, "sample"):
      record["data_dir"] = data_lib.portable_path(record["data_dir"])
    if identity is not None:
      record["data"] = identity
    os.makedirs(workdir, exist_ok=True)
    _atomic_write(os.path.join(workdir, "config.json"),
                  json.dumps(record, indent=2, allow_nan=False) + "\n")


def load_config(workdir: str) -> Config:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UsageError(f"no config.json in {workdir}: nothing trained there")
  stored = read_stored_config(workdir)
  fields = {f.name for f in dataclasses.fields(Config)}
  config = Config(**{k: v for k, v in stored.items() if k in fields})
  if config.data_dir not in (None, "sample"):  # recorded relative to the repository
    config = dataclasses.replace(config, data_dir=str(data_lib.resolve_path(config.data_dir)))
  return config


def write_metrics(workdir: str, history: list) -> None:
  """Rewrites ``metrics.jsonl`` (atomically) from the checkpointed history."""
  if jax.process_index() == 0:
    _atomic_write(os.path.join(workdir, "metrics.jsonl"),
                  "".join(json.dumps(h) + "\n" for h in history))


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_manager(workdir: str, keep: int = 3):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "history"))


def save_checkpoint(mngr, epoch: int, state: dict, history: list) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           history=ocp.args.JsonSave(history)))
  mngr.wait_until_finished()


def restore_checkpoint(mngr, state: dict, epoch: Optional[int] = None):
  """Restores (state, history) from the given epoch (default latest) onto ``state``'s layout."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  epoch = mngr.latest_step() if epoch is None else epoch
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  out = mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    history=ocp.args.JsonRestore()))
  return out["state"], list(out["history"])


# --------------------------------------------------------------------------------------------
# Training


def _pad_to(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)


class _Data(NamedTuple):
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  test_mask: jax.Array
  num_train: int
  num_test: int
  num_classes: int
  source: str
  val_images: Optional[jax.Array] = None  # --val-split: held out from the training set
  val_labels: Optional[jax.Array] = None
  val_mask: Optional[jax.Array] = None
  num_val: int = 0
  identity: Optional[dict] = None  # data_identity() of the loaded set (before any subset)


def _padded(x, y, multiple: int):
  """Pads an evaluation split to a multiple of the eval batch; returns (x, y, mask)."""
  n = len(y)
  padded = _pad_to(max(n, 1), multiple)
  mask = np.zeros(padded, bool)
  mask[:n] = True
  x = np.concatenate([x, np.zeros((padded - n,) + x.shape[1:], x.dtype)])
  y = np.concatenate([y, np.zeros(padded - n, np.int32)])
  return x, y, mask


def data_identity(dataset: str, ds: data_lib.CifarData) -> dict:
  """What identifies a run's data, whatever path it was given by (stored in config.json)."""
  return {"dataset": dataset, "kind": ds.kind, "checksum": ds.checksum,
          "train_images": int(len(ds.train_labels)), "test_images": int(len(ds.test_labels))}


def load_data(config: Config, mesh: Mesh, eval_batch_size: int) -> _Data:
  """Loads CIFAR on every process and puts it on the mesh (replicated, eval splits padded).

  ``--val-split N`` holds out the last N training images first (never trained on, never
  augmented); ``--train-subset`` then keeps the first images of the rest.
  """
  ds = data_lib.load_cifar(config.dataset, config.data_dir, allow_subset=config.allow_subset)
  tr_x, tr_y = np.asarray(ds.train_images), np.asarray(ds.train_labels, np.int32)
  te_x, te_y = np.asarray(ds.test_images), np.asarray(ds.test_labels, np.int32)
  n_val = config.val_split
  if n_val >= len(tr_y):
    raise UsageError(f"--val-split {n_val} leaves no training images (the training set has "
                     f"{len(tr_y)})")
  va_x, va_y = tr_x[len(tr_y) - n_val:], tr_y[len(tr_y) - n_val:]
  tr_x, tr_y = tr_x[:len(tr_y) - n_val], tr_y[:len(tr_y) - n_val]
  if config.train_subset:
    tr_x, tr_y = tr_x[:config.train_subset], tr_y[:config.train_subset]
  if config.test_subset:
    te_x, te_y = te_x[:config.test_subset], te_y[:config.test_subset]
  n_test = len(te_y)
  te_x, te_y, mask = _padded(te_x, te_y, eval_batch_size)
  tr_x, tr_y, te_x, te_y, mask = replicate((tr_x, tr_y, te_x, te_y, mask), mesh)
  val = (None, None, None)
  if n_val:
    val = replicate(_padded(va_x, va_y, eval_batch_size), mesh)
  return _Data(tr_x, tr_y, te_x, te_y, mask, len(tr_y), n_test, int(ds.num_classes),
               str(getattr(ds, "source", "")), *val, n_val, identity=data_identity(config.dataset, ds))


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _validate(config: Config) -> None:
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


class Diverged(RuntimeError):
  """The training loss turned non-finite; the run stops (exit code 3)."""


def _finite_or_none(x):
  # metrics.jsonl and config.json hold only valid JSON: NaN/inf are recorded as null.
  x = float(x)
  return x if math.isfinite(x) else None


def train_and_evaluate(config: Config, workdir: str, *, progress: bool = True,
                       eval_batch_size: int = 500, keep_checkpoints: int = 3,
                       steps_per_call: Optional[int] = None, log_blocks: bool = False) -> list:
  """Trains (resuming from the last checkpoint in ``workdir``) and returns the metrics history.

  Every epoch: one jitted call trains on the epoch's permutation of the training set, one
  evaluates on the validation split (``val_split > 0``) and one on the test split, a
  checkpoint is written, then ``metrics.jsonl``. With ``log_blocks`` every record also holds
  ``blocks``: per block (input to classifier) the mean effective angular step
  ``‖ΔW_b‖/‖W_b‖`` of its kernel over the epoch's steps, the mean scale-amended factor
  ``A_b/m_{b,W}`` (scale-amended runs), and at the epoch's end ``‖W_b‖`` and BatchNorm's
  ``E[γ²]``. A non-finite training loss ends the run: its record is marked ``"diverged"``,
  checkpointed, and :class:`Diverged` is raised (also on a rerun).
  """
  config = config.resolved()
  _validate(config)
  if keep_checkpoints < 1:
    raise UsageError(f"--keep-checkpoints must be at least 1 (got {keep_checkpoints}): the last "
                     "checkpoint is what a rerun resumes and --eval-only reads")
  if eval_batch_size < 1:
    raise UsageError(f"--eval-batch-size must be at least 1 (got {eval_batch_size})")
  if steps_per_call is not None and steps_per_call < 0:
    raise UsageError(f"--steps-per-call must be >= 0 (got {steps_per_call})")
  stored = check_config(config, workdir)  # refuse another run's workdir early
  prepare_workdir(workdir)  # a bad --workdir fails before the data loads
  mesh = make_mesh()
  ndev = mesh.devices.size
  eval_batch_size = _pad_to(max(eval_batch_size, 1), ndev)
  data = load_data(config, mesh, eval_batch_size)
  if data.num_classes != NUM_CLASSES[config.dataset]:
    raise UsageError(f"{config.dataset} data has {data.num_classes} classes")
  steps_per_epoch = data.num_train // config.batch_size
  if steps_per_epoch < 1:
    raise UsageError(f"batch size {config.batch_size} exceeds the {data.num_train} "
                     "training images")
  if stored is None:
    write_config(config, workdir, data.identity)
  else:
    check_data(stored, config, data.identity, workdir)

  setup, state = create_train_state(config, data.num_classes, steps_per_epoch,
                                    log_blocks=log_blocks)
  state = replicate(state, mesh)
  mngr = checkpoint_manager(workdir, keep_checkpoints)
  history: list = []
  extended = None
  if stored is not None:
    extended = check_epochs(stored, config, int(mngr.latest_step() or 0), steps_per_epoch,
                            workdir)
    if extended or "data" not in stored:  # record the new total / the data's identity
      write_config(config, workdir, data.identity)
  if mngr.latest_step() is not None:
    state, history = restore_checkpoint(mngr, state)
  write_metrics(workdir, history)  # drops epochs after the checkpoint (crash mid-epoch)
  start = len(history)
  if history and history[-1].get("diverged"):
    mngr.close()
    raise Diverged(f"the run in {workdir} diverged in epoch {history[-1]['epoch']} "
                   "(non-finite training loss); nothing to resume: use another --lr or "
                   "--workdir")
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  _log(f"{config.dataset} {config.model} width={config.width:g} ({n_params:,} params) "
       f"{config.optimizer} lr={config.lr:g} wd={config.weight_decay:g} {config.schedule} "
       f"batch={config.batch_size} epochs={config.epochs} seed={config.seed} "
       f"dtype={config.compute_dtype}; data: {data.num_train} train / {data.num_val} val / "
       f"{data.num_test} test "
       f"({data.source}); {ndev} device(s) on {jax.process_count()} process(es) "
       f"[{jax.devices()[0].platform}]" + (f"; {extended}" if extended else "")
       + ("" if not start or start >= config.epochs else f"; resuming after epoch {start}"))
  if start >= config.epochs:
    _log(f"already finished: {start}/{config.epochs} epochs trained, nothing to do (a larger "
         "--epochs extends a --schedule constant run; --eval-only evaluates it)")
    mngr.close()
    _summary(config, history, workdir, 0.0)
    return history

  t0 = time.time()
  if steps_per_call is None:  # see EpochRunner
    steps_per_call = 1 if jax.devices()[0].platform == "cpu" else 0
  runner = EpochRunner(setup, mesh, config, data, steps_per_epoch, eval_batch_size,
                       steps_per_call)
  runner.compile(state)
  _log(f"compiled in {time.time() - t0:.1f}s; {steps_per_epoch} steps per epoch, "
       f"{len(runner.train_plan)} call(s) per epoch")

  bn_momentum = _bn_momentum(config, data.num_classes)
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=config.epochs, initial=start, unit="epoch", dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0)
  run_t0 = time.time()
  for epoch in range(start, config.epochs):
    t_epoch = time.time()
    lr = float(setup.schedule(epoch * steps_per_epoch))
    state, train_sums = runner.train_epoch(state, epoch)
    train_sums = jax.device_get(train_sums)  # the epoch's one host sync for training
    t_train = time.time() - t_epoch
    val_sums = jax.device_get(runner.evaluate(state, "val")) if data.num_val else None
    test_sums = jax.device_get(runner.evaluate(state))
    diverged = not np.isfinite(train_sums["loss"])
    count = train_sums["count"]
    record = {
        "epoch": epoch + 1,
        "train_loss": _finite_or_none(train_sums["loss"] / count),
        "train_acc": float(train_sums["correct"] / count),
    }
    if val_sums is not None:
      record["val_loss"] = _finite_or_none(val_sums["loss"] / val_sums["count"])
      record["val_acc"] = float(val_sums["correct"] / val_sums["count"])
    record.update({
        "test_loss": _finite_or_none(test_sums["loss"] / test_sums["count"]),
        "test_acc": float(test_sums["correct"] / test_sums["count"]),
        "lr": lr,
        "seconds": round(time.time() - t_epoch, 3),
        "images_per_sec": round(float(count) / max(t_train, 1e-9), 1),
    })
    if setup.block_kernels:
      blocks = {"angular_step": [_finite_or_none(x) for x in train_sums["angular_step"] / count
                                 * config.batch_size]}
      if "factor" in train_sums:
        blocks["factor"] = [_finite_or_none(x) for x in train_sums["factor"] / count
                            * config.batch_size]
      blocks.update(block_statistics(setup, jax.device_get(state["params"])))
      record["blocks"] = blocks
    if diverged:
      record["diverged"] = True
    history.append(record)
    save_checkpoint(mngr, epoch + 1, state, history)
    write_metrics(workdir, history)
    if diverged:
      bar.close()
      mngr.close()
      raise Diverged(f"training loss is not finite in epoch {epoch + 1} (lr {config.lr:g}); "
                     f"stopped, the record is kept in {os.path.join(workdir, 'metrics.jsonl')}")
    fmt = lambda x: "nan" if x is None else f"{x:.4f}"
    val_msg = (f" | val loss {fmt(record['val_loss'])} acc {100 * record['val_acc']:.2f}%"
               if val_sums is not None else "")
    msg = (f"epoch {epoch + 1}/{config.epochs}: train loss {fmt(record['train_loss'])} "
           f"acc {100 * record['train_acc']:.2f}%{val_msg} | test loss "
           f"{fmt(record['test_loss'])} acc {100 * record['test_acc']:.2f}% | lr {lr:.4g} | "
           f"{record['seconds']:.1f}s {record['images_per_sec']:.0f} img/s")
    initial = bn_momentum ** ((epoch + 1) * steps_per_epoch) if bn_momentum else 0.0
    if initial > 0.05:
      msg += (f" (BatchNorm's running statistics, which the test metrics use, are still "
              f"{100 * initial:.0f}% their initial values after {(epoch + 1) * steps_per_epoch} "
              "steps: an early test loss far above the training loss is expected)")
    if bar.disable:
      _log(msg)
    else:
      bar.write(msg)
      bar.set_postfix(test_acc=f"{100 * record['test_acc']:.2f}%")
      bar.update(1)
  bar.close()
  mngr.close()
  _summary(config, history, workdir, time.time() - run_t0)
  return history


def _bn_momentum(config: Config, num_classes: int) -> Optional[float]:
  """The model's BatchNorm momentum (running = m * running + (1 - m) * batch), from its shape."""
  model = nnx.eval_shape(lambda: create_model(config, num_classes, nnx.Rngs(0)))
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      return float(module.momentum)
  return None


def _summary(config: Config, history: list, workdir: str, seconds: float) -> None:
  last = history[-1] if history else None
  if last is None:
    _log(f"summary: nothing trained in {workdir}")
    return
  _log(f"summary: {config.dataset} {config.model} width={config.width:g} {config.optimizer} "
       f"seed={config.seed}: final test acc {100 * last['test_acc']:.2f}% "
       f"(test loss {last['test_loss']}, train acc {100 * last['train_acc']:.2f}%) after "
       f"epoch {last['epoch']}/{config.epochs}; {seconds:.0f}s this session; "
       f"workdir {workdir}")


def evaluate_checkpoint(workdir: str, eval_batch_size: int = 500,
                        data_dir: Optional[str] = None) -> dict:
  """Evaluates the last checkpoint in ``workdir`` on the test split (config from the workdir)."""
  config = load_config(workdir)
  if data_dir is not None:
    config = dataclasses.replace(config, data_dir=data_dir).resolved()
  mesh = make_mesh()
  eval_batch_size = _pad_to(max(eval_batch_size, 1), mesh.devices.size)
  mngr = checkpoint_manager(workdir)
  epoch = mngr.latest_step()
  if epoch is None:
    raise UsageError(f"no checkpoint in {workdir}")
  data = load_data(config, mesh, eval_batch_size)
  setup, state = create_train_state(config, data.num_classes,
                                    max(data.num_train // config.batch_size, 1))
  state, _ = restore_checkpoint(mngr, replicate(state, mesh), epoch)
  mngr.close()
  runner = EpochRunner(setup, mesh, config, data, max(data.num_train // config.batch_size, 1),
                       eval_batch_size, steps_per_call=1)
  sums = jax.device_get(runner.evaluate(state))
  result = {"epoch": int(epoch), "test_loss": float(sums["loss"] / sums["count"]),
            "test_acc": float(sums["correct"] / sums["count"]), "count": int(sums["count"])}
  _log(f"eval-only: {config.dataset} {config.model} {config.optimizer} seed={config.seed}, "
       f"checkpoint of epoch {epoch}: test acc {100 * result['test_acc']:.2f}% "
       f"(test loss {result['test_loss']:.4f}, {result['count']} images)")
  return result


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="Train VGG-BN on CIFAR with SGD, LARS, LSALR or scale-amended SGD "
                  "(Zhang, Chen & Liu 2018, Table 1). Rerunning the same command resumes.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dataset", choices=tuple(NUM_CLASSES), default="cifar10", help="dataset")
  p.add_argument("--model", choices=models.MODELS, default="vgg11", help="VGG-BN depth")
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                 help="optimizer, at the paper's settings unless --lr/--weight-decay are given")
  p.add_argument("--epochs", type=int, default=200,
                 help="training epochs (a --schedule constant run can be extended later)")
  p.add_argument("--batch-size", type=int, default=128, help="global batch size")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate; None: the paper's (sgd/lsalr/scale_amended 0.1, "
                      "lars 2)")
  p.add_argument("--weight-decay", type=float, default=None,
                 help="None: the paper's (1e-3; scale_amended 5e-3)")
  p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
  p.add_argument("--schedule", choices=("step", "cosine", "constant"), default="step",
                 help="step: ×0.1 at 50%% and 75%% of the epochs; cosine: to 0; constant")
  p.add_argument("--width", type=float, default=1.0, help="channel multiplier")
  p.add_argument("--compute-dtype", choices=tuple(DTYPES), default="float32",
                 help="compute dtype; parameters stay float32")
  p.add_argument("--seed", type=int, default=0, help="initialization, shuffling, augmentation")
  p.add_argument("--data-dir", default=None,
                 help="CIFAR archive directory; 'sample' for the shipped sample; default: "
                      "tensorflow-datasets")
  p.add_argument("--allow-subset", action="store_true",
                 help="accept known CIFAR subset archives (e.g. cifar10-mini); implied by "
                      "--data-dir sample")
  p.add_argument("--train-subset", type=int, default=None,
                 help="use only the first N training images (smoke tests)")
  p.add_argument("--test-subset", type=int, default=None,
                 help="evaluate on the first N test images only (smoke tests)")
  p.add_argument("--val-split", type=int, default=0,
                 help="hold out the last N training images (never trained on, never "
                      "augmented) and log val_loss/val_acc each epoch; 0: the paper's protocol")
  p.add_argument("--log-blocks", action="store_true",
                 help="log per block: effective angular step |dW|/|W|, scale-amended factor, "
                      "kernel norm, BatchNorm E[gamma^2] (metrics.jsonl 'blocks')")
  g = p.add_argument_group("scale-amended SGD's reading of the paper (SPEC §6; default: the "
                           "library's default)")
  g.add_argument("--sa-pooling", choices=("before", "after", "effective"), default=None,
                 help="optax_bm.annotate(pooling=...)")
  g.add_argument("--sa-others", choices=("scaled", "unscaled"), default=None,
                 help="rescale bias/BatchNorm parameters (scale_others=True) or not")
  g.add_argument("--sa-gamma", choices=("aware", "ignored"), default=None,
                 help="BatchNorm-gamma^2-aware scalars (gamma_aware=True) or not")
  g.add_argument("--sa-decay", choices=("before", "after"), default=None,
                 help="weight decay added before or after the scaling")
  p.add_argument("--workdir", required=True, help="config, metrics and checkpoints")
  p.add_argument("--eval-only", action="store_true",
                 help="evaluate the workdir's last checkpoint on the test split")
  p.add_argument("--eval-batch-size", type=int, default=500, help="evaluation batch size")
  p.add_argument("--keep-checkpoints", type=int, default=3,
                 help="checkpoints kept (at least 1: the last one is what resumes)")
  p.add_argument("--compilation-cache-dir", default=default_compilation_cache_dir(),
                 help="JAX's persistent compilation cache, which makes a rerun, resume or "
                      "--eval-only skip recompiling (env JAX_COMPILATION_CACHE_DIR)")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="compile from scratch, without the persistent cache")
  p.add_argument("--steps-per-call", type=int, default=None,
                 help="training steps per jitted call; 0: a whole epoch in one lax.scan; "
                      "default: 1 on CPU (XLA:CPU runs convs in loops slowly), 0 elsewhere")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
  g = p.add_argument_group("multi-host (jax.distributed)")
  g.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int,
                 default=_env_int("JAX_NUM_PROCESSES"), help="(env JAX_NUM_PROCESSES)")
  g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                 help="(env JAX_PROCESS_ID)")
  g.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with cluster auto-detection "
                      "(SLURM, TPU pods, ...)")
  return p.parse_args(argv)


def _env_int(name: str) -> Optional[int]:
  v = os.environ.get(name)
  try:
    return int(v) if v else None
  except ValueError:
    return None


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


def default_compilation_cache_dir(environ=os.environ) -> str:
  """``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/optax_bm/jax`` (~/.cache/...)."""
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "optax_bm", "jax")


def enable_compilation_cache(directory: str, environ=os.environ) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in ``directory``; returns it, or None (with a
  warning) if it cannot be created. Every compilation of 0.5 s or more is cached (unless
  ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise)."""
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    print(f"warning: no compilation cache: cannot create {directory} "
          f"({e.strerror or type(e).__name__})", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory


def set_cpu_xla_flags(environ=os.environ) -> None:
  """Adds :data:`CPU_XLA_FLAGS` to ``$XLA_FLAGS``, leaving alone any flag the user already set.

  XLA reads ``$XLA_FLAGS`` once, when the first backend starts, so this must run before the
  process's first JAX computation (``jax.jit(..., compiler_options=...)`` does not reach this
  scheduler flag: the compiled schedule stays the same).
  """
  flags = environ.get("XLA_FLAGS", "").split()
  names = {f.split("=", 1)[0] for f in flags}
  flags += [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in names]
  environ["XLA_FLAGS"] = " ".join(flags)


def main(argv=None) -> int:
  args = parse_args(argv)
  set_cpu_xla_flags()
  if not args.no_compilation_cache:
    enable_compilation_cache(args.compilation_cache_dir)
  try:
    if args.distributed or args.coordinator_address or args.num_processes:
      jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes,
                                 process_id=args.process_id)
    if args.eval_only:
      evaluate_checkpoint(args.workdir, args.eval_batch_size, data_dir=args.data_dir)
    else:
      train_and_evaluate(config_from_args(args), args.workdir,
                         progress=not args.no_progress, eval_batch_size=args.eval_batch_size,
                         keep_checkpoints=args.keep_checkpoints,
                         steps_per_call=args.steps_per_call, log_blocks=args.log_blocks)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except data_lib.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume from the last checkpoint",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
