"""Model, optimizer and train state: everything built once before the first step.

:func:`create_train_state` returns the static :class:`Setup` (graph definitions, optimizer,
schedule) and the train state, a plain dict of arrays ``{"step", "params", "batch_stats",
"opt_state"}``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import models
from train.config import (DTYPES, LARS_TRUST_COEFFICIENT, OPTIMIZERS, Config, UsageError,
                          epoch_aligned_decays)


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
                 small_map_conv: Optional[bool] = None) -> nnx.Module:
  """Any model of :data:`train.models.MODELS` (``small_map_conv``: VGGs only)."""
  return models.create(config.model, num_classes, width=config.width,
                       dtype=DTYPES[config.compute_dtype], rngs=rngs,
                       small_map_conv=small_map_conv)


@functools.lru_cache(maxsize=None)
def _init_fn(model: str, num_classes: int, width: float, compute_dtype: str,
             small_map_conv: Optional[bool]):
  """A jitted ``key -> model``: initialized in one compiled call (eagerly, every initializer
  op compiles on its own: ~10 s for VGG11 on a CPU), compiled once per architecture."""
  return nnx.jit(lambda key: models.create(model, num_classes, width=width,
                                           dtype=DTYPES[compute_dtype], rngs=nnx.Rngs(key),
                                           small_map_conv=small_map_conv))


def create_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """Step decay ×0.1 at 50% and 75% of training, cosine decay to 0, or constant (the only one
  whose trained epochs stay the same when ``epochs`` grows).

  The step decays fall on the nearest epochs (:func:`train.config.epoch_aligned_decays`), or,
  with ``decay_boundaries="steps"`` (what :meth:`Config.resolved` picks for runs too short for
  two epoch-aligned decays, say 3 epochs), at 50% and 75% of the steps.
  """
  total = config.epochs * steps_per_epoch
  if config.schedule == "step":
    if config.decay_boundaries == "steps":
      bounds = sorted({int(f * total) for f in (0.5, 0.75)})
    else:
      bounds = [e * steps_per_epoch for e in epoch_aligned_decays(config.epochs)]
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
        decay_before_scaling=config.sa_decay_before_scaling,
        **_input_scale(config))
  raise UsageError(f"unknown optimizer {config.optimizer!r}; choose from "
                   f"{', '.join(OPTIMIZERS)}")


def _input_scale(config: Config) -> dict:
  """``input_scale=`` for the library (its default where the config records none: VGGs)."""
  return {} if config.sa_input_scale is None else {"input_scale": config.sa_input_scale}


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
                                   gamma_aware=config.sa_gamma_aware, **_input_scale(config))
    return jnp.stack([jnp.asarray(x, jnp.float32)
                      for x in leaves_at(scales, paths)])

  return paths, factors


def leaves_at(tree, paths) -> list:
  from optax_bm import specs as specs_lib  # pylint: disable=import-outside-toplevel
  return specs_lib.leaves_at(tree, paths)


def block_statistics(setup: Setup, params) -> dict:
  """Per block (host side, end of an epoch): kernel norm ``‖W_b‖`` and BatchNorm ``E[γ²]``."""
  kernels = leaves_at(params, setup.block_kernels)
  gammas = []
  for path in setup.block_kernels:
    # blocks/3/conv/kernel -> blocks/3; stem/conv/kernel -> stem; units/4/main/1/conv/kernel
    # -> units/4/main/1 (ResNet; shortcut/0 likewise)
    prefix = path.rsplit("/", 2)[0]
    try:
      (g,) = leaves_at(params, [f"{prefix}/bn/scale"])
      gammas.append(float(np.mean(np.square(np.asarray(g, np.float64)))))
    except ValueError:
      gammas.append(None)  # no BatchNorm (the classifier)
  return {"w_norm": [float(np.linalg.norm(np.asarray(k, np.float64))) for k in kernels],
          "gamma2": gammas}


def bn_momentum(config: Config, num_classes: int) -> Optional[float]:
  """The model's BatchNorm momentum (running = m * running + (1 - m) * batch), from its shape."""
  model = nnx.eval_shape(lambda: create_model(config, num_classes, nnx.Rngs(0)))
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      return float(module.momentum)
  return None
