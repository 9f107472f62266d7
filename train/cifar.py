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
  inside a loop (see :class:`train.steps.EpochRunner`).
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

Modules, one idea each: ``train.config`` (the run's :class:`Config`, defaults, validation),
``train.state`` (model, optimizer, schedule, train state), ``train.steps`` (train/eval steps,
the jitted multi-step runs, :class:`EpochRunner`), ``train.pipeline`` (the mesh, the data on
it, augmentation), ``train.records`` (work directory, config compatibility, metrics,
checkpoints), ``train.cli`` (what the command-line tools share); this module is the command
line and :func:`train_and_evaluate`, which strings them together.

Exit status: 0 on success, 1 for unusable data (``train.data.DataError``), 2 for bad
command-line input (argparse's own errors included), 3 for a run whose training loss or
parameters turned non-finite (:class:`Diverged`), each reported as one ``error:`` line.

Usage: ``python train/cifar.py --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional

try:  # Run as a script (python train/cifar.py) or as a module (python -m train.cifar).
  from train import cli
except ImportError:  # pragma: no cover
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from train import cli
if __name__ == "__main__":  # Ctrl-C while JAX loads: one line and exit 130, no traceback
  cli.exit_quietly_on_interrupt()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import models
from train import records
from train.cli import (default_compilation_cache_dir, enable_compilation_cache, env_int,
                       set_cpu_xla_flags)
from train.config import (DEFAULT_SETTINGS, DTYPES, NUM_CLASSES, OPTIMIZERS, PAPER_SETTINGS,
                          RESNET_LEARNING_RATE,
                          Config, UsageError, config_from_args, validate_config)
from train.pipeline import DeviceData, load_data, make_mesh, pad_to, replicate
from train.state import Setup, block_statistics, bn_momentum, create_train_state
from train.steps import EpochRunner


class Diverged(RuntimeError):
  """The training loss or the parameters turned non-finite; the run stops (exit code 3)."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Training


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
  ``E[γ²]``. A non-finite training loss or parameter ends the run (parameters can turn NaN
  while the logged loss stays finite: seen with a γ²-aware scale-amended ResNet, whose loss
  stayed at ln 10): its record is marked ``"diverged"``,
  checkpointed, and :class:`Diverged` is raised (also on a rerun).
  """
  config = config.resolved()
  _check_options(config, keep_checkpoints, eval_batch_size, steps_per_call)
  config, stored = records.check_config(config, workdir)  # refuse another run's workdir early
  created = records.prepare_workdir(workdir)  # a bad --workdir fails before the data loads
  with records.removed_on_failure(workdir, created):  # a failed first run leaves nothing
    mesh = make_mesh()
    eval_batch_size = pad_to(eval_batch_size, mesh.devices.size)
    data = load_data(config, mesh, eval_batch_size)
    steps_per_epoch = _steps_per_epoch(config, data)
    _record_or_check_data(config, workdir, stored, data)
    setup, state = create_train_state(config, data.num_classes, steps_per_epoch,
                                      log_blocks=log_blocks)
    mngr = records.checkpoint_manager(workdir, keep_checkpoints)
    try:
      extended = _allow_new_total(config, workdir, stored, data, mngr, steps_per_epoch)
      state, history = _resume(mngr, replicate(state, mesh), workdir)
      _log(_run_header(config, state, data, mesh, extended, len(history)))
      if len(history) >= config.epochs:
        _log(f"already finished: {len(history)}/{config.epochs} epochs trained, nothing to do "
             "(a larger --epochs extends a --schedule constant run; --eval-only evaluates it)")
        _summary(config, history, workdir, 0.0)
        return history
      runner = _compiled_runner(config, setup, mesh, data, state, steps_per_epoch,
                                eval_batch_size, steps_per_call)
      t0 = time.time()
      history = _train_epochs(config, setup, runner, state, history, mngr, workdir, progress)
    finally:
      mngr.close()
  _summary(config, history, workdir, time.time() - t0)
  return history


def _check_options(config: Config, keep_checkpoints: int, eval_batch_size: int,
                   steps_per_call: Optional[int]) -> None:
  """Refuses a bad config or run option (UsageError) before anything is created or loaded."""
  validate_config(config)
  if keep_checkpoints < 1:
    raise UsageError(f"--keep-checkpoints must be at least 1 (got {keep_checkpoints}): the last "
                     "checkpoint is what a rerun resumes and --eval-only reads")
  if eval_batch_size < 1:
    raise UsageError(f"--eval-batch-size must be at least 1 (got {eval_batch_size})")
  if steps_per_call is not None and steps_per_call < 0:
    raise UsageError(f"--steps-per-call must be >= 0 (got {steps_per_call})")


def _steps_per_epoch(config: Config, data: DeviceData) -> int:
  if data.num_classes != NUM_CLASSES[config.dataset]:
    raise UsageError(f"{config.dataset} data has {data.num_classes} classes")
  steps_per_epoch = data.num_train // config.batch_size
  if steps_per_epoch < 1:
    raise UsageError(f"batch size {config.batch_size} exceeds the {data.num_train} "
                     "training images")
  return steps_per_epoch


def _record_or_check_data(config: Config, workdir: str, stored: Optional[dict],
                          data: DeviceData) -> None:
  """A new run records its config and data; a rerun must be on the same data."""
  if stored is None:
    records.write_config(config, workdir, data.identity)
  else:
    records.check_data(stored, config, data.identity, workdir)


def _allow_new_total(config: Config, workdir: str, stored: Optional[dict], data: DeviceData,
                     mngr, steps_per_epoch: int) -> Optional[str]:
  """On a rerun with another ``--epochs``: refused unless the trained epochs' schedule stays the
  same; then (or for a config written before data identities) config.json is rewritten."""
  if stored is None:
    return None
  extended = records.check_epochs(stored, config, int(mngr.latest_step() or 0),
                                  steps_per_epoch, workdir)
  if extended or "data" not in stored:  # record the new total / the data's identity
    records.write_config(config, workdir, data.identity)
  return extended


def _resume(mngr, state: dict, workdir: str) -> tuple[dict, list]:
  """The last checkpoint's state and history (or the initial state and []); metrics.jsonl is
  rewritten from it, dropping epochs after the checkpoint (a crash mid-epoch)."""
  history: list = []
  if mngr.latest_step() is not None:
    state, history = records.restore_checkpoint(mngr, state)
  records.write_metrics(workdir, history)
  if history and history[-1].get("diverged"):
    raise Diverged(f"the run in {workdir} diverged in epoch {history[-1]['epoch']} "
                   "(non-finite training loss or parameters); nothing to resume: use another "
                   "--lr or --workdir")
  return state, history


def _run_header(config: Config, state: dict, data: DeviceData, mesh, extended: Optional[str],
                start: int) -> str:
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return (f"{config.dataset} {config.model} width={config.width:g} ({n_params:,} params) "
          f"{config.optimizer} lr={config.lr:g} wd={config.weight_decay:g} {config.schedule} "
          f"batch={config.batch_size} epochs={config.epochs} seed={config.seed} "
          f"dtype={config.compute_dtype}; data: {data.num_train} train / {data.num_val} val / "
          f"{data.num_test} test "
          f"({data.source}); {mesh.devices.size} device(s) on {jax.process_count()} "
          f"process(es) [{jax.devices()[0].platform}]" + (f"; {extended}" if extended else "")
          + ("" if not start or start >= config.epochs else f"; resuming after epoch {start}"))


def _compiled_runner(config: Config, setup: Setup, mesh, data: DeviceData, state: dict,
                     steps_per_epoch: int, eval_batch_size: int,
                     steps_per_call: Optional[int]) -> EpochRunner:
  t0 = time.time()
  if steps_per_call is None:  # see EpochRunner
    steps_per_call = 1 if jax.devices()[0].platform == "cpu" else 0
  runner = EpochRunner(setup, mesh, config, data, steps_per_epoch, eval_batch_size,
                       steps_per_call)
  runner.compile(state)
  _log(f"compiled in {time.time() - t0:.1f}s; {steps_per_epoch} steps per epoch, "
       f"{len(runner.train_plan)} call(s) per epoch")
  return runner


def _train_epochs(config: Config, setup: Setup, runner: EpochRunner, state: dict,
                  history: list, mngr, workdir: str, progress: bool) -> list:
  """Trains the remaining epochs: each is trained, evaluated, checkpointed, then logged."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  momentum = bn_momentum(config, runner.data.num_classes)
  bar = tqdm(total=config.epochs, initial=len(history), unit="epoch", dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0)
  try:
    for epoch in range(len(history), config.epochs):
      state, record = _train_and_evaluate_epoch(config, setup, runner, state, epoch)
      history.append(record)
      records.save_checkpoint(mngr, epoch + 1, state, history)
      records.write_metrics(workdir, history)
      if record.get("diverged"):
        what = ("training loss is" if record["train_loss"] is None else "parameters are")
        raise Diverged(f"{what} not finite in epoch {epoch + 1} (lr {config.lr:g}); "
                       f"stopped, the record is kept in {os.path.join(workdir, 'metrics.jsonl')}")
      msg = _epoch_message(config, record, momentum, (epoch + 1) * runner.steps_per_epoch)
      if bar.disable:
        _log(msg)
      else:
        bar.write(msg)
        bar.set_postfix(test_acc=f"{100 * record['test_acc']:.2f}%")
        bar.update(1)
  finally:
    bar.close()
  return history


def _train_and_evaluate_epoch(config: Config, setup: Setup, runner: EpochRunner, state: dict,
                              epoch: int) -> tuple[dict, dict]:
  """One epoch's training and evaluation; returns the new state and its metrics record."""
  finite_or_none = records.finite_or_none
  t_epoch = time.time()
  lr = float(setup.schedule(epoch * runner.steps_per_epoch))
  state, train_sums = runner.train_epoch(state, epoch)
  train_sums = jax.device_get(train_sums)  # the epoch's one host sync for training
  t_train = time.time() - t_epoch
  val_sums = jax.device_get(runner.evaluate(state, "val")) if runner.data.num_val else None
  test_sums = jax.device_get(runner.evaluate(state))
  count = train_sums["count"]
  record = {
      "epoch": epoch + 1,
      "train_loss": finite_or_none(train_sums["loss"] / count),
      "train_acc": float(train_sums["correct"] / count),
  }
  if val_sums is not None:
    record["val_loss"] = finite_or_none(val_sums["loss"] / val_sums["count"])
    record["val_acc"] = float(val_sums["correct"] / val_sums["count"])
  record.update({
      "test_loss": finite_or_none(test_sums["loss"] / test_sums["count"]),
      "test_acc": float(test_sums["correct"] / test_sums["count"]),
      "lr": lr,
      "seconds": round(time.time() - t_epoch, 3),
      "images_per_sec": round(float(count) / max(t_train, 1e-9), 1),
  })
  if setup.block_kernels:
    blocks = {"angular_step": [finite_or_none(x) for x in train_sums["angular_step"] / count
                               * config.batch_size]}
    if "factor" in train_sums:
      blocks["factor"] = [finite_or_none(x) for x in train_sums["factor"] / count
                          * config.batch_size]
    stats = block_statistics(setup, jax.device_get(state["params"]))
    blocks.update({k: [finite_or_none(x) for x in xs] for k, xs in stats.items()})
    record["blocks"] = blocks
  params_finite = bool(jax.device_get(_all_finite(state["params"])))
  if not np.isfinite(train_sums["loss"]) or not params_finite:
    record["diverged"] = True
  return state, record


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every element of every leaf is finite (one scalar: the epoch's check is cheap)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _epoch_message(config: Config, record: dict, momentum: Optional[float],
                   steps_done: int) -> str:
  fmt = lambda x: "nan" if x is None else f"{x:.4f}"
  val_msg = (f" | val loss {fmt(record['val_loss'])} acc {100 * record['val_acc']:.2f}%"
             if "val_acc" in record else "")
  msg = (f"epoch {record['epoch']}/{config.epochs}: train loss {fmt(record['train_loss'])} "
         f"acc {100 * record['train_acc']:.2f}%{val_msg} | test loss "
         f"{fmt(record['test_loss'])} acc {100 * record['test_acc']:.2f}% | lr "
         f"{record['lr']:.4g} | {record['seconds']:.1f}s {record['images_per_sec']:.0f} img/s")
  initial = momentum ** steps_done if momentum else 0.0
  if initial > 0.05:
    msg += (f" (BatchNorm's running statistics, which the test metrics use, are still "
            f"{100 * initial:.0f}% their initial values after {steps_done} "
            "steps: an early test loss far above the training loss is expected)")
  return msg


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
  config = records.load_config(workdir)
  if data_dir is not None:
    config = dataclasses.replace(config, data_dir=data_dir).resolved()
  mesh = make_mesh()
  eval_batch_size = pad_to(max(eval_batch_size, 1), mesh.devices.size)
  mngr = records.checkpoint_manager(workdir)
  epoch = mngr.latest_step()
  if epoch is None:
    raise UsageError(f"no checkpoint in {workdir}")
  data = load_data(config, mesh, eval_batch_size)
  steps_per_epoch = max(data.num_train // config.batch_size, 1)
  setup, state = create_train_state(config, data.num_classes, steps_per_epoch)
  state, _ = records.restore_checkpoint(mngr, replicate(state, mesh), epoch)
  mngr.close()
  runner = EpochRunner(setup, mesh, config, data, steps_per_epoch, eval_batch_size,
                       steps_per_call=1)
  sums = jax.device_get(runner.evaluate(state))
  result = {"epoch": int(epoch), "test_loss": float(sums["loss"] / sums["count"]),
            "test_acc": float(sums["correct"] / sums["count"]), "count": int(sums["count"])}
  _log(f"eval-only: {config.dataset} {config.model} {config.optimizer} seed={config.seed}, "
       f"checkpoint of epoch {epoch}: test acc {100 * result['test_acc']:.2f}% "
       f"(test loss {result['test_loss']:.4f}, {result['count']} images)")
  return result


# --------------------------------------------------------------------------------------------
# Command line


def _settings_text(settings: dict, i: int) -> str:
  return ", ".join(f"{name} {values[i]:g}" for name, values in settings.items())


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.ArgumentParser(
      prog="train/cifar.py",
      description="Train VGG-BN or ResNet on CIFAR with SGD, LARS, LSALR or scale-amended SGD "
                  "(Zhang, Chen & Liu 2018, Table 1). Rerunning the same command resumes.")
  p.add_argument("--dataset", choices=tuple(NUM_CLASSES), default="cifar10", help="dataset")
  p.add_argument("--model", choices=models.MODELS, default="vgg11",
                 help="VGG-BN depth, or a CIFAR ResNet (He et al. 2016; a trailing b: option-B "
                      "shortcuts)")
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                 help="optimizer, at the learning rate chosen on validation and the paper's "
                      "weight decay unless --lr/--weight-decay are given")
  p.add_argument("--epochs", type=int, default=200,
                 help="training epochs (a --schedule constant run can be extended later)")
  p.add_argument("--batch-size", type=int, default=128, help="global batch size")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate; default: the one chosen on a CIFAR-10 validation "
                      "split (train/results/ablation_cifar10): "
                      f"{_settings_text(DEFAULT_SETTINGS, 0)}, except lsalr, not screened "
                      "there, at the paper's; on ResNets, "
                      + ", ".join(f"{name} {lr:g}" for name, lr in RESNET_LEARNING_RATE.items())
                      + " (chosen on ResNet-20's validation split); the paper's own: "
                      f"{_settings_text(PAPER_SETTINGS, 0)}")
  p.add_argument("--weight-decay", type=float, default=None,
                 help="default: the paper's (1e-3; scale_amended 5e-3); ResNets with sgd: "
                      "He et al.'s 1e-4 (none published for the others on ResNets: they keep "
                      "theirs)")
  p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
  p.add_argument("--schedule", choices=("step", "cosine", "constant"), default="step",
                 help="step: ×0.1 at 50%% and 75%% of the epochs; cosine: to 0; constant")
  p.add_argument("--width", type=float, default=1.0,
                 help="channel multiplier (the narrowest convolution keeps at least 4 "
                      "channels: >= 0.0547 for VGG, >= 0.219 for ResNets)")
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
  g = p.add_argument_group("scale-amended SGD's reading of the paper (docs/method.md#6-open-points-and-what-decided-them; default: the "
                           "library's default)")
  g.add_argument("--sa-pooling", choices=("before", "after", "effective"), default=None,
                 help="optax_bm.annotate(pooling=...)")
  g.add_argument("--sa-others", choices=("scaled", "unscaled"), default=None,
                 help="rescale bias/BatchNorm parameters (scale_others=True) or not")
  g.add_argument("--sa-gamma", choices=("aware", "ignored"), default=None,
                 help="BatchNorm-gamma^2-aware scalars (gamma_aware=True) or not")
  g.add_argument("--sa-decay", choices=("before", "after"), default=None,
                 help="weight decay added before or after the scaling")
  g.add_argument("--sa-input-scale", choices=("propagated", "unit"), default=None,
                 help="a residual unit's input second moment in the factors (ResNets only; "
                      "scale_amended_sgd(input_scale=...); default: the library's, unit)")
  p.add_argument("--workdir", required=True,
                 help="config, metrics and checkpoints (required; rerun to resume)")
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
                 default=env_int("JAX_NUM_PROCESSES"), help="(env JAX_NUM_PROCESSES)")
  g.add_argument("--process-id", type=int, default=env_int("JAX_PROCESS_ID"),
                 help="(env JAX_PROCESS_ID)")
  g.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with cluster auto-detection "
                      "(SLURM, TPU pods, ...)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.raise_on_interrupt()  # from here Ctrl-C is handled below (the checkpoints are kept)
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
  status = main()
  cli.exit_quietly_on_interrupt()  # Ctrl-C while JAX and orbax shut down: 130, one line
  sys.exit(status)
