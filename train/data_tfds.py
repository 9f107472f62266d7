"""CIFAR-10/100 from tensorflow-datasets (way 1 of ``train.data``, whose :func:`load_cifar`
calls :func:`load_tfds` when given no data directory), and the reachability probe run before
a download."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import threading
from typing import Callable, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]
CIFAR_HOST = "www.cs.toronto.edu"
# Named in every error of this way in.
_ALTERNATIVES = (
    "Alternatives: --data-dir DIR with the official archives from "
    "https://www.cs.toronto.edu/~kriz/cifar.html (python or binary version, .tar.gz or "
    "extracted), or --data-dir sample for the small CIFAR-10 sample shipped with optax_bm "
    "(in Python: load_cifar(dataset, data_dir=...)).")


def probe_cifar_host(
    host: str = CIFAR_HOST, port: int = 443, timeout: float = 3.0
) -> Optional[str]:
  """Tries a TCP connection to ``host:port``; returns ``None`` if it opens, else the reason.

  The connection runs in a daemon thread joined with ``timeout``, which also bounds a DNS
  lookup that hangs (``socket`` timeouts do not cover name resolution).
  """
  outcome: list[Optional[str]] = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      outcome.append(None)
    except OSError as e:
      outcome.append(f"{type(e).__name__}: {e}")

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  if not outcome:
    return f"no answer from {host}:{port} within {timeout:g} s"
  return outcome[0]


_TFDS_PACKAGES = (  # module, what needs it
    ("tensorflow_datasets", "tensorflow-datasets"),
    ("tensorflow", "TensorFlow (tfds reads its prepared files with tf.data)"),
    ("importlib_resources", "importlib_resources (tfds 4.9 imports it to download)"),
)


def load_tfds(dataset: str, num_classes: int, probe: Callable[[], Optional[str]],
              tfds_data_dir: Optional[PathLike]) -> "data.CifarData":
  """Way 1 of ``train.data``: ``dataset`` (``num_classes`` classes) from tensorflow-datasets
  (see that module's docstring); ``probe`` runs only before a download."""
  # Imported here: train.data imports this module.
  from train import data  # pylint: disable=import-outside-toplevel
  # find_spec, not import: importing tfds (and TensorFlow) alone can take many seconds.
  missing = [what for module, what in _TFDS_PACKAGES if importlib.util.find_spec(module) is None]
  if missing:
    raise data.DataError(
        f"loading {dataset} without a data directory needs {', '.join(missing)} "
        f"(pip install 'optax_bm[tfds]'), which is not installed. {_ALTERNATIVES}")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # As in Flax's examples: keep TensorFlow off the accelerators, which belong to JAX (by
    # default TF would reserve all GPU memory).
    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except Exception as e:  # a broken install can fail on import in any way
    raise data.DataError(f"tensorflow-datasets is installed but cannot be imported "
                         f"({type(e).__name__}: {e}); reinstall it with pip install "
                         f"'optax_bm[tfds]'. {_ALTERNATIVES}") from e
  where = "" if tfds_data_dir is None else os.fspath(pathlib.Path(tfds_data_dir).expanduser())
  try:
    builder = tfds.builder(dataset, data_dir=where or None)
    prepared = builder.is_prepared()
  except Exception as e:  # tfds reports its failures with many types.
    raise data.DataError(
        f"tensorflow-datasets cannot open {dataset}: {e}. {_ALTERNATIVES}") from e
  if not prepared:
    problem = probe()
    if problem is not None:
      raise data.DataError(
          f"{dataset} is not prepared in tensorflow-datasets' {builder.data_dir} and cannot be "
          f"downloaded: {CIFAR_HOST} is unreachable ({problem}). {_ALTERNATIVES}")
    try:
      builder.download_and_prepare()
    except Exception as e:
      raise data.DataError(
          f"tensorflow-datasets failed to download and prepare {dataset}: {e}. "
          f"{_ALTERNATIVES}") from e
  try:
    train, test = tfds.as_numpy(builder.as_dataset(
        split=["train", "test"], batch_size=-1, as_supervised=True))
  except Exception as e:
    raise data.DataError(
        f"tensorflow-datasets failed to load {dataset}: {e}. {_ALTERNATIVES}") from e
  (train_images, train_labels), (test_images, test_labels) = train, test
  arrays = (np.asarray(train_images, np.uint8), np.asarray(train_labels, np.int32),
            np.asarray(test_images, np.uint8), np.asarray(test_labels, np.int32))
  return data.CifarData(
      *arrays, num_classes,
      source=f"{dataset} from tensorflow-datasets ({'prepared' if prepared else 'downloaded'} "
      f"in {data.portable_path(builder.data_dir)}): {len(train_labels)} train / "
      f"{len(test_labels)} test images", kind="tfds", checksum=data.content_md5(*arrays))
