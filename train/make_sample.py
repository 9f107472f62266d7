"""Cuts the shipped CIFAR-10 sample, ``train/sample/cifar-10-python.tar.gz``, from cifar10-mini.

    python -m train.make_sample ../shared/data/cifar10-mini   # from the repository root

The sample holds the first 100 training images of each class (in archive order, data_batch_1
first) and the first 20 test images of each class, in their original order, written in the
official python layout (``data_batch_1..5`` of 200 images each, ``test_batch`` of 200,
``batches.meta``) so that :func:`train.data.load_cifar` reads it with the same code as the full
archive. The output is byte-for-byte reproducible (fixed tar metadata, gzip mtime 0) for a given
zlib; the script prints its size and MD5 for ``SUBSET_ARCHIVES`` in ``train/data.py``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pathlib
import pickle
import sys
import tarfile

import numpy as np

from train import data

TRAIN_PER_CLASS = 100
TEST_PER_CLASS = 20
NUM_BATCHES = 5
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of the first ``per_class`` examples of every class, in ascending order."""
  picked = [np.flatnonzero(labels == c)[:per_class] for c in range(len(LABEL_NAMES))]
  if any(len(p) < per_class for p in picked):
    raise ValueError(f"fewer than {per_class} examples in some class")
  return np.sort(np.concatenate(picked))


def batch_pickle(batch_label: str, images: np.ndarray, labels: np.ndarray) -> bytes:
  # The official batch layout: rows of 1024 red, then green, then blue values.
  rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
  batch = {b"batch_label": batch_label.encode(), b"labels": [int(x) for x in labels],
           b"data": rows}
  return pickle.dumps(batch, protocol=2)


def tar_gz(members: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for name, blob in members.items():
      info = tarfile.TarInfo(name)
      info.size, info.mode, info.mtime = len(blob), 0o644, 0
      tar.addfile(info, io.BytesIO(blob))
  return gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mini_dir", help="directory (or archive) of the cifar10-mini subset")
  parser.add_argument("--out", default=str(data.SAMPLE_DIR / "cifar-10-python.tar.gz"))
  args = parser.parse_args(argv)
  try:
    mini = data.load_cifar("cifar10", args.mini_dir, allow_subset=True)
  except data.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  train = first_per_class(mini.train_labels, TRAIN_PER_CLASS)
  test = first_per_class(mini.test_labels, TEST_PER_CLASS)
  root = "cifar-10-batches-py"
  members = {}
  for i, part in enumerate(np.split(train, NUM_BATCHES), start=1):
    members[f"{root}/data_batch_{i}"] = batch_pickle(
        f"training batch {i} of {NUM_BATCHES}", mini.train_images[part], mini.train_labels[part])
  members[f"{root}/test_batch"] = batch_pickle(
      "testing batch 1 of 1", mini.test_images[test], mini.test_labels[test])
  members[f"{root}/batches.meta"] = pickle.dumps(
      {b"num_cases_per_batch": len(train) // NUM_BATCHES,
       b"label_names": [n.encode() for n in LABEL_NAMES], b"num_vis": 3072}, protocol=2)

  blob = tar_gz(members)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(blob)
  print(f"{out}: {len(train)} train / {len(test)} test images from {mini.source}")
  print(f"size {len(blob)} bytes, md5 {hashlib.md5(blob).hexdigest()}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
