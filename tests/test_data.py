"""Tests for train/data.py: the three ways in, the archive checks, and the on-device pipeline.

Nothing here touches the network: the tfds path runs with a fake module and a mocked probe,
and, where tensorflow-datasets and TensorFlow are installed (``pip install -e ".[tfds]"``),
with the real tfds code on a data directory prepared offline from the shipped sample; the
probe itself is tried on loopback sockets only. Shared data is found relative to the
repository root, as ``../shared``.
"""

import gzip
import hashlib
import importlib.machinery
import importlib.util
import io
import os
import pathlib
import pickle
import socket
import struct
import sys
import tarfile
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import data, pipeline

SAMPLE_ARCHIVE = data.SAMPLE_DIR / "cifar-10-python.tar.gz"
REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared beside the repository, as in CI
MINI_DIR = SHARED_DATA / "cifar10-mini"
FULL_C10_DIR = SHARED_DATA / "cifar10" / "cifar-10-batches-py"


def needs_shared(path, *names):
  missing = [str(path / n) for n in names if not (path / n).exists()] or (
      [] if path.is_dir() else [str(path)])
  return pytest.mark.skipif(bool(missing), reason="shared data missing (expected beside the "
                            f"repository as ../shared): {', '.join(missing)}")


needs_mini = needs_shared(MINI_DIR, "cifar-10-python.tar.gz", "cifar-10-binary.tar.gz")
needs_full_c10 = needs_shared(FULL_C10_DIR, *data.OFFICIAL_FILE_MD5["cifar-10-batches-py"])
C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


# ------------------------------------------------------------------------------------------------
# Reference readings, written independently of train/data.py.


def hand_decode(rows):
  """[n, 3072] official rows (red plane, green plane, blue plane) -> [n, 32, 32, 3]."""
  planes = [rows[:, k * 1024:(k + 1) * 1024].reshape(-1, 32, 32) for k in range(3)]
  return np.stack(planes, axis=-1)


@pytest.fixture(scope="module")
def sample_batches():
  """{member name: (rows, labels)} of the shipped sample, read with plain tarfile + pickle."""
  batches = {}
  with tarfile.open(SAMPLE_ARCHIVE) as tar:
    for name in C10_TRAIN + ["test_batch"]:
      batch = pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")
      batches[name] = (batch[b"data"], np.array(batch[b"labels"]))
  return batches


@pytest.fixture(scope="module")
def reference(sample_batches):
  train = [sample_batches[n] for n in C10_TRAIN]
  return data.CifarData(
      hand_decode(np.concatenate([r for r, _ in train])), np.concatenate([l for _, l in train]),
      hand_decode(sample_batches["test_batch"][0]), sample_batches["test_batch"][1], 10, "")


def assert_same_arrays(got, want):
  for field in ("train_images", "train_labels", "test_images", "test_labels"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  assert got.num_classes == want.num_classes


def binary_file(rows, *label_columns):
  """Official binary records: label byte(s), then the 3072 pixel bytes."""
  return b"".join(struct.pack(f"{len(labels)}B", *labels) + row.tobytes()
                  for row, *labels in zip(rows, *label_columns))


def write_tree(root, files):
  for name, blob in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(blob)


def write_tar_gz(path, files):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for name, blob in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  path.write_bytes(gzip.compress(buffer.getvalue()))
  return path


def register_subset(monkeypatch, path):
  """Declares a test-made archive a known subset archive, as cifar10-mini is one."""
  blob = path.read_bytes()
  entry = data.ArchiveChecksum(len(blob), hashlib.md5(blob).hexdigest(), "test archive")
  known = data.SUBSET_ARCHIVES.get(path.name, ())
  monkeypatch.setitem(data.SUBSET_ARCHIVES, path.name, known + (entry,))


def c10_binary_files(sample_batches):
  return {f"cifar-10-batches-bin/{name}.bin": binary_file(rows, labels)
          for name, (rows, labels) in sample_batches.items()}


def c10_python_dir(tmp_path):
  with tarfile.open(SAMPLE_ARCHIVE) as tar:
    tar.extractall(tmp_path, filter="data")
  return tmp_path / "cifar-10-batches-py"


# ------------------------------------------------------------------------------------------------
# Reading: the sample, both formats, packed and extracted, CIFAR-10 and CIFAR-100.


def test_sample_matches_hand_decoding(reference, sample_batches):
  got = data.load_cifar("cifar10", "sample")
  chex.assert_shape(got.train_images, (1000, 32, 32, 3))
  chex.assert_shape(got.test_images, (200, 32, 32, 3))
  chex.assert_type([got.train_images, got.test_images], np.uint8)
  chex.assert_type([got.train_labels, got.test_labels], np.int32)
  assert_same_arrays(got, reference)
  np.testing.assert_array_equal(np.bincount(got.train_labels), [100] * 10)
  np.testing.assert_array_equal(np.bincount(got.test_labels), [20] * 10)
  assert "sample" in got.source and "1000 train / 200 test" in got.source
  # One pixel by hand: image 3 of test_batch, row 5, column 7, blue.
  rows, _ = sample_batches["test_batch"]
  assert got.test_images[3, 5, 7, 2] == rows[3, 2 * 1024 + 5 * 32 + 7]
  assert data.load_cifar("cifar10", data.SAMPLE_DIR).source == got.source


@pytest.mark.parametrize("layout", ["python-tar.gz", "python-dir", "python-files",
                                    "binary-tar.gz", "binary-dir", "binary-files"])
def test_cifar10_formats_agree(layout, tmp_path, monkeypatch, reference, sample_batches):
  if layout == "python-tar.gz":
    path = SAMPLE_ARCHIVE
  elif layout == "python-dir":
    path = c10_python_dir(tmp_path)
  elif layout == "python-files":  # an extracted directory under another name
    path = c10_python_dir(tmp_path).rename(tmp_path / "my-copy")
  elif layout == "binary-dir":
    write_tree(tmp_path, c10_binary_files(sample_batches))
    path = tmp_path  # found inside the parent directory
  elif layout == "binary-files":
    write_tree(tmp_path, c10_binary_files(sample_batches))
    path = (tmp_path / "cifar-10-batches-bin").rename(tmp_path / "my-copy")
  else:
    path = write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", c10_binary_files(sample_batches))
    register_subset(monkeypatch, path)
  assert_same_arrays(data.load_cifar("cifar10", path, allow_subset=True), reference)
  with pytest.raises(data.DataError, match="allow-subset"):
    data.load_cifar("cifar10", path)


@needs_mini
def test_mini_archives_need_the_subset_path(tmp_path):
  python = data.load_cifar("cifar10", MINI_DIR / "cifar-10-python.tar.gz", allow_subset=True)
  binary = data.load_cifar("cifar10", MINI_DIR / "cifar-10-binary.tar.gz", allow_subset=True)
  assert_same_arrays(binary, python)
  assert (len(python.train_labels), len(python.test_labels)) == (4085, 817)
  assert "cifar10-mini" in python.source and "MD5 verified" in python.source
  # The first binary record of data_batch_1, decoded by hand.
  with tarfile.open(MINI_DIR / "cifar-10-binary.tar.gz") as tar:
    record = tar.extractfile("cifar-10-batches-bin/data_batch_1.bin").read(3073)
  assert python.train_labels[0] == record[0]
  for r, c, ch in [(0, 0, 0), (31, 31, 2), (10, 20, 1)]:
    assert python.train_images[0, r, c, ch] == record[1 + ch * 1024 + r * 32 + c]
  for name in ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"):
    with pytest.raises(data.DataError, match=f"{name} is the cifar10-mini subset.*--allow-subset"):
      data.load_cifar("cifar10", MINI_DIR / name)
  # Extracted, they are the same arrays, again only with allow_subset.
  for name in ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"):
    with tarfile.open(MINI_DIR / name) as tar:
      tar.extractall(tmp_path, filter="data")
  for directory in ("cifar-10-batches-py", "cifar-10-batches-bin"):
    got = data.load_cifar("cifar10", tmp_path / directory, allow_subset=True)
    assert_same_arrays(got, python)
    assert got.checksum == python.checksum  # the same data, whatever its format and path
  assert "6 of 6 files differ from the official ones" in data.load_cifar(
      "cifar10", tmp_path / "cifar-10-batches-py", allow_subset=True).source
  with pytest.raises(data.DataError, match="data_batch_1: MD5 [0-9a-f]{32}, expected "
                     "c99cafc152244af753f735de768cd75f .*5 more of its 6 files differ.*"
                     "--allow-subset"):
    data.load_cifar("cifar10", tmp_path / "cifar-10-batches-py")
  with pytest.raises(data.DataError, match="4085 train / 817 test images, but the official"):
    data.load_cifar("cifar10", tmp_path / "cifar-10-batches-bin")


@needs_full_c10
def test_full_extracted_cifar10_is_md5_verified(tmp_path):
  full = data.load_cifar("cifar10", FULL_C10_DIR)
  assert (len(full.train_labels), len(full.test_labels)) == data.OFFICIAL_COUNTS
  assert "per-file MD5 verified" in full.source and full.kind == "directory"
  assert full.source.startswith("cifar10 from ../shared/data/cifar10/cifar-10-batches-py ")
  np.testing.assert_array_equal(np.bincount(full.test_labels), [1000] * 10)
  # The same files by another path (a directory of links): the same data, the same checksum.
  copy = tmp_path / "cifar-10-batches-py"
  copy.mkdir()
  for name in data.OFFICIAL_FILE_MD5["cifar-10-batches-py"]:
    (copy / name).symlink_to(FULL_C10_DIR / name)
  assert data.load_cifar("cifar10", tmp_path).checksum == full.checksum
  # One modified image in an otherwise official test batch: structurally valid, not official.
  (copy / "test_batch").unlink()
  batch = pickle.loads((FULL_C10_DIR / "test_batch").read_bytes(), encoding="latin1")
  batch["data"][0, 0] ^= 1
  (copy / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
  # With the official 10000 images it is a damaged copy, not a subset: refused either way.
  for allow_subset in (False, True):
    with pytest.raises(data.DataError, match=f"{copy / 'test_batch'}: MD5 [0-9a-f]{{32}}, "
                       "expected 40351d587109b95175f43aff81a1287e .*holds the official 10000 "
                       "images: the file is corrupted or modified, not a subset") as e:
      data.load_cifar("cifar10", copy, allow_subset=allow_subset)
    assert "allow-subset" not in str(e.value)
  # The subset an accelerator run carries (data_batch_1 and test_batch), as is.
  carried = tmp_path / "carried" / "cifar-10-batches-py"
  carried.mkdir(parents=True)
  for name in ("data_batch_1", "test_batch"):
    (carried / name).symlink_to(FULL_C10_DIR / name)
  with pytest.raises(data.DataError, match="data_batch_2: no such file .*--allow-subset"):
    data.load_cifar("cifar10", carried)
  subset = data.load_cifar("cifar10", carried, allow_subset=True)
  assert (len(subset.train_labels), len(subset.test_labels)) == (10000, 10000)
  assert "per-file MD5 verified (2 files)" in subset.source
  assert "data_batch_2, data_batch_3, data_batch_4, data_batch_5 absent" in subset.source
  np.testing.assert_array_equal(subset.train_images, full.train_images[:10000])
  # The same files under another directory name: read the same way.
  renamed = carried.rename(tmp_path / "carried" / "c10-subset")
  assert data.load_cifar("cifar10", renamed, allow_subset=True).checksum == subset.checksum


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_cifar100_layout(binary, packed, tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  splits = {}
  for split, n in (("train", 7), ("test", 3)):
    fine = rng.integers(0, 100, n)
    fine[0] = 99
    splits[split] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), fine, fine // 5)
  if binary:
    root = "cifar-100-binary"
    files = {f"{root}/{s}.bin": binary_file(rows, coarse, fine)
             for s, (rows, fine, coarse) in splits.items()}
    files[f"{root}/fine_label_names.txt"] = b"apple\n"
  else:
    root = "cifar-100-python"
    files = {f"{root}/{s}": pickle.dumps(  # str keys, as a Python 3 user would write them
        {"filenames": [f"{i}.png" for i in range(len(rows))], "batch_label": s,
         "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(), "data": rows},
        protocol=2) for s, (rows, fine, coarse) in splits.items()}
    files[f"{root}/meta"] = pickle.dumps({"fine_label_names": ["apple"]}, protocol=2)
  if packed:
    path = write_tar_gz(tmp_path / f"{root}.tar.gz", files)
    register_subset(monkeypatch, path)
  else:
    write_tree(tmp_path, files)
    path = tmp_path / root

  got = data.load_cifar("cifar100", path, allow_subset=True)
  want = data.CifarData(hand_decode(splits["train"][0]), splits["train"][1],
                        hand_decode(splits["test"][0]), splits["test"][1], 100, "")
  assert_same_arrays(got, want)
  assert got.train_labels.max() == 99  # fine labels, not the 20 coarse ones
  with pytest.raises(data.DataError, match="allow-subset"):
    data.load_cifar("cifar100", path)


# ------------------------------------------------------------------------------------------------
# Rejections.


@pytest.mark.parametrize("allow_subset", [False, True])
def test_official_name_wrong_size_is_rejected(allow_subset, tmp_path):
  path = tmp_path / "cifar-10-python.tar.gz"
  path.write_bytes(np.random.default_rng(0).bytes(1000))
  msg = f"{path}: 1,000 bytes, expected 170,498,071 .*truncated, corrupted or not a CIFAR archive"
  with pytest.raises(data.DataError, match=msg):
    data.load_cifar("cifar10", path, allow_subset=allow_subset)


def test_official_size_wrong_md5_is_rejected(tmp_path):
  path = tmp_path / "cifar-100-binary.tar.gz"
  with open(path, "wb") as f:  # sparse: the official size, all zeros
    f.truncate(data.OFFICIAL_ARCHIVES[path.name].size)
  with pytest.raises(data.DataError, match=f"{path}: MD5 [0-9a-f]{{32}}, expected "
                     "03b5dce01913d631647c71ecec9e9cb8; the file is corrupted"):
    data.load_cifar("cifar100", tmp_path)


def test_truncated_archive_is_rejected(tmp_path, monkeypatch):
  path = tmp_path / "cifar-10-python.tar.gz"
  path.write_bytes(SAMPLE_ARCHIVE.read_bytes()[:-5000])
  with pytest.raises(data.DataError, match="truncated"):
    data.load_cifar("cifar10", path, allow_subset=True)
  # Even with matching checksums, a cut stream fails cleanly inside tarfile/gzip.
  register_subset(monkeypatch, path)
  with pytest.raises(data.DataError, match=f"{path}: not a readable .tar.gz archive"):
    data.load_cifar("cifar10", path, allow_subset=True)


def test_foreign_pickle_cannot_run_code(tmp_path):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (pathlib.Path.touch, (marker,))

  directory = c10_python_dir(tmp_path)
  (directory / "data_batch_2").write_bytes(pickle.dumps(Exploit(), protocol=2))
  with pytest.raises(data.DataError, match="data_batch_2: not a CIFAR batch pickle.*refusing"):
    data.load_cifar("cifar10", directory, allow_subset=True)
  assert not marker.exists()


@pytest.mark.parametrize("allow_subset", [False, True])
def test_damaged_file_of_full_size_is_refused_even_with_allow_subset(allow_subset, tmp_path,
                                                                      monkeypatch):
  """A batch file with the official image count and another MD5 is corruption: --allow-subset
  (for fewer images or files) cannot help, and the error does not suggest it."""
  directory = c10_python_dir(tmp_path)
  path = directory / "data_batch_3"
  batch = pickle.loads(path.read_bytes(), encoding="latin1")
  # Let the sample's files stand for the official ones: their MD5s and image counts.
  counts = data.load_cifar("cifar10", directory, allow_subset=True)
  monkeypatch.setattr(data, "OFFICIAL_COUNTS", (len(counts.train_labels),
                                                len(counts.test_labels)))
  md5s = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in directory.iterdir()
          if f.name in data.OFFICIAL_FILE_MD5["cifar-10-batches-py"]}
  monkeypatch.setitem(data.OFFICIAL_FILE_MD5, "cifar-10-batches-py", md5s)
  assert "per-file MD5 verified" in data.load_cifar("cifar10", directory).source
  key = {k.decode() if isinstance(k, bytes) else k: k for k in batch}  # py2 or py3 keys
  batch[key["data"]][0, :2] ^= 0xFF  # two pixel bytes flipped
  path.write_bytes(pickle.dumps(batch, protocol=2))
  with pytest.raises(data.DataError, match=f"{path}: MD5 [0-9a-f]{{32}}, expected "
                     f"{md5s['data_batch_3']} .*holds "
                     f"the official {len(batch[key['labels']])} images: the file is corrupted") as e:
    data.load_cifar("cifar10", directory, allow_subset=allow_subset)
  assert "allow-subset" not in str(e.value)


def test_junk_under_an_official_name_does_not_suggest_allow_subset(tmp_path):
  directory = c10_python_dir(tmp_path)
  (directory / "data_batch_2").write_bytes(b"\x80\x02 junk")
  with pytest.raises(data.DataError, match="data_batch_2: not a CIFAR batch pickle") as e:
    data.load_cifar("cifar10", directory)
  assert "allow-subset" not in str(e.value)


@pytest.mark.parametrize("name, blob, match", [
    ("data_batch_1", b"\x80\x02 random bytes", "not a CIFAR batch pickle"),
    ("data_batch_1", pickle.dumps([1, 2, 3]), "the pickle holds a list, not a CIFAR batch dict"),
    ("data_batch_3", pickle.dumps({b"labels": [1]}), r"the batch has no \['data'\]"),
    ("test_batch", pickle.dumps({"labels": [1], "data": np.zeros((1, 3072), np.float32)}),
     r"'data' is float32 \(1, 3072\), expected a uint8 array"),
    ("test_batch", pickle.dumps({"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)}),
     "'labels' has shape"),
    ("test_batch", pickle.dumps({"labels": [10], "data": np.zeros((1, 3072), np.uint8)}),
     "labels span 10..10, outside 0..9"),
])
def test_foreign_python_batch_is_rejected(name, blob, match, tmp_path):
  directory = c10_python_dir(tmp_path)
  (directory / name).write_bytes(blob)
  with pytest.raises(data.DataError, match=f"{directory / name}: {match}"):
    data.load_cifar("cifar10", directory, allow_subset=True)


def test_foreign_binary_batch_is_rejected(tmp_path, sample_batches):
  write_tree(tmp_path, c10_binary_files(sample_batches))
  path = tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(data.DataError, match=f"{path}: 614599 bytes is not a whole number of "
                     "3073-byte records"):
    data.load_cifar("cifar10", tmp_path, allow_subset=True)
  # An absent training batch: an error naming it, unless a subset is allowed; then the
  # batches present are read and the source says which were absent.
  path.unlink()
  with pytest.raises(data.DataError, match="data_batch_4.bin: no such file .*--allow-subset"):
    data.load_cifar("cifar10", tmp_path)
  got = data.load_cifar("cifar10", tmp_path, allow_subset=True)
  assert "data_batch_4.bin absent" in got.source
  test_file = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
  test_file.unlink()  # the test batch is never optional
  with pytest.raises(data.DataError, match=f"{test_file}: cannot read"):
    data.load_cifar("cifar10", tmp_path, allow_subset=True)
  for i in (1, 2, 3, 5):
    (tmp_path / "cifar-10-batches-bin" / f"data_batch_{i}.bin").unlink()
  with pytest.raises(data.DataError, match="none of the training batch files"):
    data.load_cifar("cifar10", tmp_path, allow_subset=True)


def test_bad_requests(tmp_path):
  with pytest.raises(data.DataError, match="unknown dataset 'mnist'"):
    data.load_cifar("mnist", "sample")
  with pytest.raises(data.DataError, match="CIFAR-10 only"):
    data.load_cifar("cifar100", "sample")
  with pytest.raises(data.DataError, match="no such file or directory"):
    data.load_cifar("cifar10", tmp_path / "nowhere")
  with pytest.raises(data.DataError, match="no cifar10 data found; expected one of "
                     "cifar-10-python.tar.gz.*or a directory holding an extracted one's files "
                     r"\(test_batch, ...\)"):
    data.load_cifar("cifar10", tmp_path)
  (tmp_path / "data_batch_1").write_bytes(b"")  # training batches alone are not recognised
  with pytest.raises(data.DataError, match="no cifar10 data found"):
    data.load_cifar("cifar10", tmp_path)
  # The shipped archive by its path is a subset archive like any other.
  with pytest.raises(data.DataError, match="optax_bm sample.*allow-subset"):
    data.load_cifar("cifar10", SAMPLE_ARCHIVE)


# ------------------------------------------------------------------------------------------------
# The tfds path: fails within seconds, naming the alternatives.


class FakeBuilder:
  """What train/data.py uses of a tfds DatasetBuilder; records the calls."""

  def __init__(self, name, data_dir, prepared, splits=None, fail=None):
    self.name, self.data_dir, self.prepared = name, data_dir or "/fake/tensorflow_datasets", prepared
    self.splits, self.fail, self.calls = splits, fail, []

  def is_prepared(self):
    return self.prepared

  def download_and_prepare(self):
    self.calls.append("download_and_prepare")
    if self.fail:
      raise self.fail
    self.prepared = True

  def as_dataset(self, split, batch_size, as_supervised):
    assert (split, batch_size, as_supervised) == (["train", "test"], -1, True)
    self.calls.append("as_dataset")
    return self.splits


class _Builders(list):
  hidden: list


def fake_tfds(monkeypatch, **builder_kwargs):
  """Installs a fake tensorflow_datasets (and the modules the path needs); returns its builder."""
  module = types.ModuleType("tensorflow_datasets")
  module.__spec__ = importlib.machinery.ModuleSpec("tensorflow_datasets", None)
  builders = _Builders()

  def builder(name, data_dir=None):
    builders.append(FakeBuilder(name, data_dir, **builder_kwargs))
    return builders[-1]

  module.builder, module.as_numpy = builder, lambda tree: tree
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
  for name in ("tensorflow", "importlib_resources"):
    stub = types.ModuleType(name)
    stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, stub)
  hidden = []
  sys.modules["tensorflow"].config = types.SimpleNamespace(
      set_visible_devices=lambda devices, kind: hidden.append((devices, kind)))
  builders.hidden = hidden
  return builders


def assert_names_alternatives(message):
  assert "--data-dir DIR" in message and "--data-dir sample" in message
  assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_tfds_missing_fails_fast(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import and find_spec: absent
  start = time.perf_counter()
  with pytest.raises(data.DataError, match=r"needs tensorflow-datasets.*optax_bm\[tfds\]") as error:
    data.load_cifar("cifar10", probe=lambda: pytest.fail("no probe without tfds"))
  assert time.perf_counter() - start < 2
  assert_names_alternatives(str(error.value))


@pytest.mark.parametrize("module, named", [
    ("tensorflow", "TensorFlow"), ("importlib_resources", "importlib_resources")])
def test_tfds_without_what_it_needs_fails_fast(module, named, monkeypatch):
  """tfds 4.9.10 installs without TensorFlow and without importlib_resources, both needed."""
  builders = fake_tfds(monkeypatch, prepared=False)
  monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(data.DataError, match=rf"needs {named}.*optax_bm\[tfds\]") as error:
    data.load_cifar("cifar10", probe=lambda: pytest.fail("no probe"))
  assert "tensorflow-datasets" not in str(error.value).split("needs")[1].split("(pip")[0]
  assert not builders  # stopped before touching tfds
  assert_names_alternatives(str(error.value))


def test_tfds_unreachable_fails_fast(monkeypatch):
  builders = fake_tfds(monkeypatch, prepared=False)
  start = time.perf_counter()
  with pytest.raises(data.DataError, match="cifar100 is not prepared in tensorflow-datasets' "
                     "/fake/tensorflow_datasets and cannot be downloaded: www.cs.toronto.edu "
                     r"is unreachable \(mocked: no route\)") as error:
    data.load_cifar("cifar100", probe=lambda: "mocked: no route")
  assert time.perf_counter() - start < 2
  assert_names_alternatives(str(error.value))
  assert builders[0].calls == []  # no download tried


def test_tfds_prepared_data_is_read_offline_without_probe(monkeypatch, tmp_path):
  images = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
  labels = np.array([3, 97], np.int64)
  builders = fake_tfds(monkeypatch, prepared=True,
                       splits=((images, labels), (images[:1], labels[:1])))
  got = data.load_cifar("cifar100", probe=lambda: pytest.fail("probed with the data prepared"),
                        tfds_data_dir=tmp_path)
  assert builders[0].data_dir == str(tmp_path)
  assert builders[0].calls == ["as_dataset"]
  assert builders.hidden == [([], "GPU")]  # TensorFlow kept off the GPUs, which JAX uses
  chex.assert_type([got.train_labels, got.test_labels], np.int32)
  np.testing.assert_array_equal(got.train_images, images)
  assert got.num_classes == 100 and "tensorflow-datasets (prepared in" in got.source
  assert got.kind == "tfds" and len(got.checksum) == 32


def test_tfds_download_then_read_and_failures(monkeypatch):
  images = np.zeros((1, 32, 32, 3), np.uint8)
  splits = ((images, np.zeros(1)), (images, np.zeros(1)))
  builders = fake_tfds(monkeypatch, prepared=False, splits=splits)
  probes = []
  got = data.load_cifar("cifar10", probe=lambda: probes.append(1))
  assert probes == [1] and builders[0].calls == ["download_and_prepare", "as_dataset"]
  assert "downloaded in" in got.source
  fake_tfds(monkeypatch, prepared=False, fail=RuntimeError("download interrupted"))
  with pytest.raises(data.DataError, match="failed to download and prepare cifar10: download "
                     "interrupted"):
    data.load_cifar("cifar10", probe=lambda: None)


def _real_tfds():
  tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed "
                             "(pip install -e '.[tfds]')")
  pytest.importorskip("tensorflow", reason="TensorFlow not installed (pip install -e '.[tfds]')")
  return tfds


def test_real_tfds_prepared_offline_then_read_without_network(tmp_path, monkeypatch,
                                                              sample_batches):
  """The real tensorflow-datasets code: prepare cifar10 from local files, then read it."""
  tfds = _real_tfds()
  extracted = tmp_path / "download"
  write_tree(extracted, c10_binary_files(sample_batches))
  (extracted / "cifar-10-batches-bin" / "batches.meta.txt").write_text(
      "\n".join(f"class{i}" for i in range(10)) + "\n")
  # Only the network fetch is replaced: tfds's builder, preparation, TFRecords and tf.data run.
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      lambda self, url: str(extracted))
  store = tmp_path / "tensorflow_datasets"
  unreachable = lambda: "mocked: offline"
  with pytest.raises(data.DataError, match="not prepared .*cannot be downloaded"):
    data.load_cifar("cifar10", probe=unreachable, tfds_data_dir=store)
  data.load_cifar("cifar10", probe=lambda: None, tfds_data_dir=store)  # "downloads" + prepares

  def no_download(self, url):
    raise AssertionError("downloaded although prepared")

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_download)
  got = data.load_cifar("cifar10", probe=lambda: pytest.fail("probed although prepared"),
                        tfds_data_dir=store)
  assert "prepared in" in got.source and got.kind == "tfds"
  sample = data.load_cifar("cifar10", "sample")

  def rows(images, labels):  # tfds shuffles on preparation: compare as sets of examples
    return sorted(img.tobytes() + bytes([int(l)]) for img, l in zip(images, labels))

  assert rows(got.train_images, got.train_labels) == rows(sample.train_images,
                                                          sample.train_labels)
  assert rows(got.test_images, got.test_labels) == rows(sample.test_images, sample.test_labels)


def test_probe_on_loopback():
  with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    assert data.probe_cifar_host("127.0.0.1", port, timeout=2) is None
  # Nothing listens there any more.
  assert "ConnectionRefusedError" in data.probe_cifar_host("127.0.0.1", port, timeout=2)


# ------------------------------------------------------------------------------------------------
# On-device pipeline.


def test_normalize(reference):
  mean, std = (np.array(s) for s in pipeline.CHANNEL_STATS["cifar10"])
  pixel = jnp.asarray(np.round(255 * (mean + std)).astype(np.uint8)).reshape(1, 1, 1, 3)
  np.testing.assert_allclose(pipeline.normalize(pixel), np.ones((1, 1, 1, 3)), atol=0.01)
  out = jax.jit(pipeline.normalize, static_argnums=(1, 2))(
      jnp.asarray(reference.train_images), "cifar10", jnp.bfloat16)
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_shape(out, reference.train_images.shape)
  out = np.asarray(out, np.float32)  # real images: roughly standardized per channel
  np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=0.1)
  np.testing.assert_allclose(out.std((0, 1, 2)), 1, atol=0.1)


def test_augment_outputs_are_shifted_flipped_windows():
  # Every pixel value is distinct and nonzero, so a window of the padded image is identifiable.
  image = 1 + jnp.arange(32 * 32 * 3, dtype=jnp.float32).reshape(32, 32, 3)
  batch = jnp.broadcast_to(image, (64, 32, 32, 3))
  out = np.asarray(jax.jit(pipeline.augment)(jax.random.key(0), batch))
  padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)))
  seen = set()
  for crop in out:
    matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
               if np.array_equal(crop, (lambda w: w[:, ::-1] if flip else w)(
                   padded[dy:dy + 32, dx:dx + 32]))]
    assert len(matches) == 1, matches
    seen.add(matches[0])
  assert {flip for *_, flip in seen} == {False, True}
  assert len({(dy, dx) for dy, dx, _ in seen}) > 20


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32, jnp.bfloat16])
def test_augment_keeps_shape_and_dtype(dtype):
  images = jnp.ones((5, 32, 32, 3), dtype)
  out = jax.jit(pipeline.augment)(jax.random.key(1), images)
  chex.assert_shape(out, images.shape)
  chex.assert_type(out, dtype)


def test_augment_keyed_by_seed_and_epoch(reference):
  images = jnp.asarray(reference.train_images[:32])

  def run(seed, epoch, step=0):
    _, augment_key = pipeline.epoch_keys(seed, epoch)
    return np.asarray(pipeline.augment(jax.random.fold_in(augment_key, step), images))

  np.testing.assert_array_equal(run(0, 3), run(0, 3))
  assert not np.array_equal(run(0, 3), run(0, 4))
  assert not np.array_equal(run(0, 3), run(1, 3))
  assert not np.array_equal(run(0, 3, step=0), run(0, 3, step=1))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs the 4 CPU devices of conftest.py")
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_augment_on_a_batch_sharded_dataset(axis_type, reference):
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(axis_type,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  images = jnp.asarray(reference.train_images[:64])
  key = jax.random.key(7)
  sharded = jax.jit(pipeline.augment)(key, jax.device_put(images, sharding))
  assert sharded.sharding.spec[0] == "batch"
  np.testing.assert_array_equal(sharded, jax.jit(pipeline.augment)(key, images))


def test_epoch_permutation_and_batches():
  perm = pipeline.epoch_permutation(0, 2, 10)
  np.testing.assert_array_equal(np.sort(perm), np.arange(10))
  np.testing.assert_array_equal(perm, pipeline.epoch_permutation(0, 2, 10))
  np.testing.assert_array_equal(perm, jax.jit(pipeline.epoch_permutation, static_argnums=2)(0, 2, 10))
  assert not np.array_equal(perm, pipeline.epoch_permutation(0, 3, 10))
  assert not np.array_equal(perm, pipeline.epoch_permutation(1, 2, 10))

  idx = jax.jit(pipeline.batch_indices, static_argnums=1)(perm, 3)
  chex.assert_shape(idx, (3, 3))  # 10 // 3 steps; the last example is dropped
  np.testing.assert_array_equal(idx.ravel(), perm[:9])
  with pytest.raises(ValueError, match="batch size 11 exceeds the 10 examples"):
    pipeline.batch_indices(perm, 11)
