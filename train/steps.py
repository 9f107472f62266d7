"""Training and evaluation steps, and how they run on a mesh of devices.

``train_step`` / ``eval_step`` (pure functions of the state and a batch); the 1-D data-parallel
mesh; the jitted multi-step runs that gather, augment and normalize each batch on the device
(:func:`make_train_steps`, :func:`make_eval_steps`); and :class:`EpochRunner`, which runs an
epoch with a chosen number of steps per jitted call.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import pipeline
from train.pipeline import DATA_AXIS, DeviceData, replicate
from train.config import Config
from train.state import Setup, leaves_at


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
    w = leaves_at(state["params"], setup.block_kernels)
    u = leaves_at(updates, setup.block_kernels)
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


def zero_metrics(setup: Optional[Setup] = None):
  """Zero metric sums: (loss, correct, count), plus the per-block sums of --log-blocks."""
  out = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
  if setup is not None and setup.block_kernels:
    out["angular_step"] = jnp.zeros((len(setup.block_kernels),), jnp.float32)
    if setup.block_factors is not None:
      out["factor"] = jnp.zeros((len(setup.block_kernels),), jnp.float32)
  return out


def make_train_step(setup: Setup, mesh: Mesh, donate: bool = False) -> Callable:
  """``train_step`` jitted for the mesh: batch sharded, state replicated."""
  repl, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(functools.partial(train_step, setup=setup),
                 in_shardings=(repl, batch, batch), out_shardings=(repl, repl),
                 donate_argnums=(0,) if donate else ())


def make_epoch_batches(config: Config, mesh: Mesh, num_train: int):
  """A jitted ``epoch -> (batch indices [steps, B], augmentation key)``, from (seed, epoch).

  The permutation is ``pipeline.epoch_permutation(seed, epoch, n)`` split into batches (the last
  ``n mod B`` examples dropped); the key is ``pipeline.epoch_keys(seed, epoch)[1]``.
  """

  def fn(epoch):
    _, augment_key = pipeline.epoch_keys(config.seed, epoch)
    perm = pipeline.epoch_permutation(config.seed, epoch, num_train)
    return pipeline.batch_indices(perm.astype(jnp.int32), config.batch_size), augment_key

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
      x = pipeline.augment(jax.random.fold_in(augment_key, i), x)
      x = jax.lax.with_sharding_constraint(
          pipeline.normalize(x, config.dataset, setup.dtype), batch_sharding)
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

      x = pipeline.normalize(get(images), dataset, setup.dtype)
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

  def __init__(self, setup: Setup, mesh: Mesh, config: Config, data: "DeviceData",
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
    train_zeros = replicate(jax.device_get(zero_metrics(self.setup)), self.mesh)
    zeros = replicate(jax.device_get(zero_metrics()), self.mesh)
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
    sums = replicate(jax.device_get(zero_metrics(self.setup)), self.mesh)
    for first, k in self.train_plan:
      state, sums = self.train_fns[k](state, sums, d.train_images, d.train_labels, batches,
                                      key, self._scalar(first))
    return state, sums

  def evaluate(self, state, split: str = "test"):
    """Metric sums over a split ("test" or "val"; on the device), with running averages."""
    sums = replicate(jax.device_get(zero_metrics()), self.mesh)
    for first, k in self.eval_plans[split]:
      sums = self.eval_fns[split, k](sums, state, *self.splits[split], self._scalar(first))
    return sums
