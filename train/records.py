"""The work directory: stored config and its compatibility, metrics files, orbax checkpoints.

``config.json`` (a rerun with another config is refused), ``checkpoints/`` (orbax, one per
epoch) and ``metrics.jsonl``, rewritten atomically from the history saved inside each
checkpoint, so after any crash it holds exactly the checkpointed epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from typing import Optional

import jax
import numpy as np

from train import atomic
from train import data as data_lib
from train import models
from train.config import Config, UsageError
from train.state import create_schedule


atomic_write = atomic.write_text


def finite_or_none(x):
  # metrics.jsonl and config.json hold only valid JSON: NaN/inf are recorded as null (and a
  # statistic that does not exist, None, stays null).
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


# Config fields compared after the data is loaded (data: by identity, not path) or allowed to
# change (epochs: when the trained epochs' schedule stays the same), see train_and_evaluate.
_LATE_FIELDS = ("data_dir", "epochs")


def prepare_workdir(workdir: str) -> bool:
  """Creates ``workdir`` if needed and checks that it can be written (before any data loads);
  returns whether it created it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir}: exists and is not a directory")
  created = not os.path.exists(workdir)
  probe = os.path.join(workdir, f".write-test-{os.getpid()}-{jax.process_index()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"--workdir {workdir}: cannot create or write it "
                     f"({e.strerror or type(e).__name__})") from None
  return created


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir`` holds a finished orbax checkpoint (a step directory)."""
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


@contextlib.contextmanager
def removed_on_failure(workdir: str, created: bool):
  """Removes ``workdir`` when the block fails before the first checkpoint and this run created
  it: a failed first run leaves nothing behind (its config.json alone would pin the flags)."""
  try:
    yield
  except BaseException:
    if created and not has_checkpoint(workdir):
      shutil.rmtree(workdir, ignore_errors=True)
    raise


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


def check_config(config: Config, workdir: str) -> tuple[Config, Optional[dict]]:
  """``(config, stored config)`` if ``workdir`` holds this run, ``(config, None)`` if it holds
  none; UsageError if it holds another one.

  A run stored before ``decay_boundaries`` existed resumes with the schedule it started with
  (epoch-aligned decays), also where a new run of its length would now decay at steps; one
  stored before ``sa_input_scale`` existed, with ``"propagated"``, the library's default then.
  ``data_dir`` and ``epochs`` are left to :func:`check_data` and :func:`check_epochs`.
  """
  stored = read_stored_config(workdir)
  if stored is None:
    return config, None
  if stored.get("decay_boundaries") is None and config.decay_boundaries == "steps":
    config = dataclasses.replace(config, decay_boundaries=None)
  new = config.to_json()
  if stored.get("sa_input_scale") is None and new.get("sa_input_scale") is not None:
    # Stored before --sa-input-scale existed: a scale-amended ResNet ran with the library's
    # default of that time, "propagated" (the default is "unit" since), so resuming it takes
    # that flag, and the error below names both readings.
    if stored.get("optimizer") == "scale_amended" and stored.get("model") in models.RESNETS:
      stored = {**stored, "sa_input_scale": "propagated"}
  diff = [f"{k}: {stored.get(k)!r} there, {new.get(k)!r} here"
          for k in sorted(set(stored) | set(new)) if k not in _LATE_FIELDS + ("data",)
          and stored.get(k) != new.get(k)]
  if diff:
    raise UsageError(f"workdir {workdir} holds a run with a different config ("
                     + "; ".join(diff) + "); use another --workdir or the same flags")
  return config, stored


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
    atomic_write(os.path.join(workdir, "config.json"),
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
    atomic_write(os.path.join(workdir, "metrics.jsonl"),
                  "".join(json.dumps(h) + "\n" for h in history))


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# Where orbax moves a checkpoint past ``keep`` (one atomic rename) before we delete it. Orbax's
# own deletion removes a step directory's files in place, so a run killed during it left a
# half-deleted step that orbax still lists as a checkpoint.
CHECKPOINT_TRASH = "trash"


def checkpoint_manager(workdir: str, keep: int = 3):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  empty_checkpoint_trash(directory)  # what a killed run was deleting
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True,
                                         enable_async_checkpointing=False,
                                         todelete_subdir=CHECKPOINT_TRASH)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "history"))


def empty_checkpoint_trash(directory: str) -> None:
  """Deletes the checkpoints orbax set aside (process 0 only, as orbax deletes)."""
  if jax.process_index() == 0:
    shutil.rmtree(os.path.join(directory, CHECKPOINT_TRASH), ignore_errors=True)


def save_checkpoint(mngr, epoch: int, state: dict, history: list) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           history=ocp.args.JsonSave(history)))
  mngr.wait_until_finished()
  empty_checkpoint_trash(str(mngr.directory))


def restore_checkpoint(mngr, state: dict, epoch: Optional[int] = None):
  """Restores (state, history) from the given epoch (default latest) onto ``state``'s layout."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  epoch = mngr.latest_step() if epoch is None else epoch
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  out = mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    history=ocp.args.JsonRestore()))
  return out["state"], list(out["history"])
