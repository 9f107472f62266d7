"""CIFAR-10/100 for the trainer: three ways to load it into host memory, and its checks.

The on-device input pipeline (augmentation, normalization, shuffling) is ``train.pipeline``.
Way 1 below is in ``train.data_tfds``, the published checksums in ``train.data_checksums``
(both re-exported here).

Three ways in, one result (:class:`CifarData`: NumPy ``uint8`` NHWC images, ``int32`` labels):

1. ``load_cifar(dataset)`` (``data_dir=None``): tensorflow-datasets reads the set from its data
   directory (``tfds_data_dir``, else ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), and
   downloads and prepares it there first if it is not prepared yet. Needs the optional extra
   ``optax_bm[tfds]`` (tensorflow-datasets, TensorFlow, which tfds uses to read the prepared
   files, and ``importlib_resources``, which tfds 4.9 imports for a download without declaring
   it). Only when the data is not prepared, and before handing over to tfds for the download,
   :func:`probe_cifar_host` tries ``www.cs.toronto.edu:443`` (where the CIFAR archives are
   hosted) with a 3 s limit, so a machine without the packages or without network gets a
   :class:`DataError` naming the alternatives within seconds, not a download that hangs, and
   an offline machine with the data already prepared reads it.
2. ``load_cifar(dataset, DIR)``: the official archives of
   https://www.cs.toronto.edu/~kriz/cifar.html that the user already has, read with NumPy and
   the standard library. ``DIR`` may be an archive (``cifar-10-python.tar.gz``,
   ``cifar-10-binary.tar.gz``, ``cifar-100-python.tar.gz``, ``cifar-100-binary.tar.gz``), an
   extracted directory (``cifar-10-batches-py``, ``cifar-10-batches-bin``, ``cifar-100-python``,
   ``cifar-100-binary``), a directory holding one of these, or a directory under another name
   holding an extracted directory's files (``test_batch``, ``data_batch_1``, ... directly). In a
   directory the first present is read, in the order: python archive, binary archive, python
   directory, binary directory, python files, binary files; a bad first candidate is an error,
   never a silent fallback to the next.
3. ``load_cifar("cifar10", "sample")`` (the string ``"sample"``, or :data:`SAMPLE_DIR`): the
   small real CIFAR-10 sample shipped in ``train/sample/`` (1000 train / 200 test images, see its
   README), an official-format archive read by the same code as 2.

What is checked (ways 2 and 3); a check is never relaxed, ``allow_subset`` only widens what is
accepted:

* An archive is identified by its byte size and MD5. A full archive must match the published
  values in :data:`OFFICIAL_ARCHIVES`. The archives in :data:`SUBSET_ARCHIVES` (the 4085-image
  cifar10-mini archives and the shipped sample) are accepted only with ``allow_subset=True``
  (CLI ``--allow-subset``; ``"sample"`` implies it). Any other file under an official name,
  truncated, corrupted or foreign, is rejected, with or without ``allow_subset``; to train on a
  custom subset, extract it and pass the directory.
* An extracted python-version directory (``cifar-10-batches-py``, ``cifar-100-python``) is
  identified file by file: each batch file read must match its published MD5
  (:data:`OFFICIAL_FILE_MD5`, the per-file list the dataset's distributors publish, also used by
  torchvision); a file that differs (a subset, a modified or corrupted copy) is accepted only
  with ``allow_subset=True``. The binary version's files have no published per-file checksum,
  so an extracted binary directory is accepted on its structure and label checks and the
  official counts. Every file's structure is validated either way (binary: a whole number of
  3073-byte (CIFAR-10) or 3074-byte (CIFAR-100) records; pickle: a dict with a ``(n, 3072)``
  ``uint8`` ``data`` array and ``n`` integer labels) as well as the label range, and the totals
  must be the official 50000 train / 10000 test images unless ``allow_subset=True``.
  :attr:`CifarData.source` reports the file, how it was checked and the counts.
* :attr:`CifarData.checksum` is the MD5 of the decoded arrays (train images, train labels,
  test images, test labels): the same data read from another path, or from the other format,
  has the same checksum, so it identifies a run's data independently of where it lies.
* Pickles are read by an unpickler that admits NumPy arrays and nothing else, so a foreign
  pickle cannot run code.

CIFAR-100 uses the fine labels (100 classes).

Errors and exit contract: every problem with the data or its source raises :class:`DataError`
(a ``ValueError``) whose message names the file or path and what is wrong (for way 1, also the
alternatives). The CLI (``train/cifar.py``) catches ``DataError``, prints ``error: <message>``
to stderr and exits with status 1, without a traceback; any other exception is a bug and
propagates.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import tarfile
import zlib
from typing import Callable, NamedTuple, Optional, Union

import numpy as np

from train import data_tfds
# Re-exported: the checksum tables, the probe.
from train.data_checksums import (OFFICIAL_ARCHIVES, OFFICIAL_FILE_MD5, SUBSET_ARCHIVES,
                                  ArchiveChecksum)
from train.data_tfds import CIFAR_HOST, probe_cifar_host

PathLike = Union[str, os.PathLike]

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sample"
REPO_ROOT = SAMPLE_DIR.parent.parent  # the checkout (or install prefix) holding train/
OFFICIAL_COUNTS = (50_000, 10_000)  # train, test images; the same for CIFAR-10 and CIFAR-100.


class DataError(ValueError):
  """The data, or the way it was asked for, cannot be used; the message says why and where."""


class CifarData(NamedTuple):
  """A CIFAR train/test split held in host memory."""

  train_images: np.ndarray  # uint8 [N, 32, 32, 3], NHWC
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray  # uint8 [M, 32, 32, 3]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  source: str  # where the data came from and how it was checked, for logs
  kind: str = ""  # "sample", "archive", "directory" or "tfds"
  checksum: str = ""  # MD5 of the decoded arrays: the data's identity, whatever its path


def portable_path(path: PathLike) -> str:
  """``path`` as recorded in logs and committed files: relative to the repository root when it
  lies inside it (``train/sample``) or in the ``shared/`` or ``data/`` directory beside it
  (``../shared/data/cifar10``; ``../data/cifar-100-python``, where the CIFAR-100 rebuild goes),
  else absolute.

  :func:`resolve_path` turns it back into a path; relative paths there are relative to
  :data:`REPO_ROOT`, not to the working directory.
  """
  path = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  for base, prefix in ((REPO_ROOT, pathlib.PurePosixPath()),
                       (REPO_ROOT.parent / "shared", pathlib.PurePosixPath("../shared")),
                       (REPO_ROOT.parent / "data", pathlib.PurePosixPath("../data"))):
    try:
      rel = path.relative_to(base)
    except ValueError:
      continue
    return (prefix / rel.as_posix()).as_posix() if rel.parts or prefix.parts else "."
  return path.as_posix()


def resolve_path(recorded: PathLike) -> pathlib.Path:
  """The path that :func:`portable_path` recorded: relative paths are under :data:`REPO_ROOT`."""
  path = pathlib.Path(os.path.expanduser(os.fspath(recorded)))
  return path if path.is_absolute() else pathlib.Path(os.path.normpath(REPO_ROOT / path))


def content_md5(*arrays: np.ndarray) -> str:
  """MD5 over the arrays' bytes in order (labels as little-endian int32): a data identity."""
  digest = hashlib.md5()
  for a in arrays:
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
      a = a.astype("<i4")
    digest.update(np.ascontiguousarray(a).data)
  return digest.hexdigest()


class _Format(NamedTuple):
  archive: str  # official archive name
  directory: str  # its top-level directory, also the name of the extracted directory
  train: tuple[str, ...]  # batch files, in order
  test: tuple[str, ...]
  binary: bool


class _Spec(NamedTuple):
  num_classes: int
  label_key: str  # labels in a python-version batch
  label_bytes: int  # labels per binary record; the last one is the class
  formats: tuple[_Format, _Format]  # python, binary: the lookup order


_C10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_SPECS = {
    "cifar10": _Spec(10, "labels", 1, (
        _Format("cifar-10-python.tar.gz", "cifar-10-batches-py", _C10_BATCHES,
                ("test_batch",), binary=False),
        _Format("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                tuple(f"{b}.bin" for b in _C10_BATCHES), ("test_batch.bin",), binary=True),
    )),
    # Binary CIFAR-100 records hold the coarse (20-class) label, then the fine one.
    "cifar100": _Spec(100, "fine_labels", 2, (
        _Format("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",),
                binary=False),
        _Format("cifar-100-binary.tar.gz", "cifar-100-binary", ("train.bin",), ("test.bin",),
                binary=True),
    )),
}


def load_cifar(
    dataset: str,
    data_dir: Optional[PathLike] = None,
    *,
    allow_subset: bool = False,
    probe: Callable[[], Optional[str]] = probe_cifar_host,
    tfds_data_dir: Optional[PathLike] = None,
) -> CifarData:
  """Loads CIFAR-10 or CIFAR-100 into host memory (see the module docstring for the sources).

  Args:
    dataset: ``"cifar10"`` or ``"cifar100"``.
    data_dir: ``None`` for tensorflow-datasets; ``"sample"`` (or :data:`SAMPLE_DIR`) for the
      shipped CIFAR-10 sample (the string always means it: write ``./sample`` for a directory
      of that name); else an official archive, an extracted archive directory, a directory
      holding one of them, or a directory holding an extracted directory's files.
    allow_subset: also accept the known subset archives of :data:`SUBSET_ARCHIVES`, extracted
      files that differ from the official ones, extracted directories with fewer (or more)
      images than the official 50000 / 10000, and extracted directories with only some of the
      training batch files (the ones present are read, say ``data_batch_1`` alone for a copy
      carried to an accelerator). Implied by ``"sample"``.
    probe: reachability check run before a tfds download (not when tfds has the data
      prepared); returns ``None`` or why the host cannot be reached. Replaceable for tests.
    tfds_data_dir: tensorflow-datasets' data directory (default: tfds's own,
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Returns:
    The train and test splits, ``num_classes``, a description of the source, its kind and the
    checksum of the decoded arrays.

  Raises:
    DataError: unknown dataset, data not found, not installed, unreachable, or failing a check.
  """
  if dataset not in _SPECS:
    raise DataError(f"unknown dataset {dataset!r}: expected one of {sorted(_SPECS)}")
  if data_dir is None:
    return data_tfds.load_tfds(dataset, _SPECS[dataset].num_classes, probe, tfds_data_dir)
  path = SAMPLE_DIR if os.fspath(data_dir) == "sample" else pathlib.Path(data_dir).expanduser()
  kind = "directory"
  if path.resolve() == SAMPLE_DIR:
    if dataset != "cifar10":
      raise DataError(f"the shipped sample ({portable_path(SAMPLE_DIR)}) is CIFAR-10 only, not "
                      f"{dataset}")
    allow_subset, kind = True, "sample"

  spec = _SPECS[dataset]
  fmt, path = _locate(path, dataset, spec)
  shown = portable_path(path)
  train_names = fmt.train
  if path.is_dir():
    train_names, absent = _present_train_files(path, fmt, allow_subset)
    files = {name: _read_file(path / name) for name in train_names + fmt.test}
    checked, separator = _verify_files(path, fmt, spec, files, dataset, allow_subset), "/"
    if absent:
      checked += f"; {', '.join(absent)} absent"
  else:
    checked, separator = _verify_archive(path, fmt, allow_subset) + ", MD5 verified", ":"
    files = _read_archive(path, fmt)
    kind = "sample" if kind == "sample" else "archive"

  def split(names):
    parts = [_parse(files[n], f"{shown}{separator}{n}", spec, fmt) for n in names]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts]).astype(np.int32)
    # Rows hold 1024 red, then green, then blue values, each plane row-major.
    return np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels

  train_images, train_labels = split(train_names)
  test_images, test_labels = split(fmt.test)
  counts = (len(train_labels), len(test_labels))
  if counts != OFFICIAL_COUNTS and not allow_subset:
    raise DataError(
        f"{shown}: {counts[0]} train / {counts[1]} test images, but the official {dataset} has "
        f"{OFFICIAL_COUNTS[0]} / {OFFICIAL_COUNTS[1]}; pass allow_subset=True "
        "(--allow-subset) to train on a subset")
  return CifarData(
      train_images, train_labels, test_images, test_labels, spec.num_classes,
      source=f"{dataset} from {shown} ({checked}): {counts[0]} train / {counts[1]} test images",
      kind=kind, checksum=content_md5(train_images, train_labels, test_images, test_labels))


def _present_train_files(path: pathlib.Path, fmt: _Format, allow_subset: bool) -> tuple:
  """The training batch files to read from an extracted directory, and the absent ones.

  All of them, unless ``allow_subset``: then the ones present (at least one), so that a
  subset carried to another machine (say ``data_batch_1`` and ``test_batch``) is read as is.
  """
  absent = [name for name in fmt.train if not (path / name).exists()]
  if not absent:
    return fmt.train, []
  if not allow_subset:
    raise DataError(f"{portable_path(path / absent[0])}: no such file (of {len(absent)} absent "
                    f"training batch files); pass allow_subset=True (--allow-subset) to train "
                    "on the batches present")
  if len(absent) == len(fmt.train):
    raise DataError(f"{portable_path(path)}: none of the training batch files "
                    f"({', '.join(fmt.train)}) is there")
  return tuple(name for name in fmt.train if name not in absent), absent


def _official_images(fmt: _Format, name: str) -> int:
  """How many images the official file ``name`` holds (10000 for every CIFAR-10 batch)."""
  train, test = OFFICIAL_COUNTS
  return train // len(fmt.train) if name in fmt.train else test // len(fmt.test)


def _verify_files(path: pathlib.Path, fmt: _Format, spec: _Spec, files: dict[str, bytes],
                  dataset: str, allow_subset: bool) -> str:
  """Checks extracted files against their published MD5s; returns how they were checked.

  A file that differs is a subset only if it holds fewer (or more) images than the official
  one; with the official count it is a damaged copy, refused with or without
  ``allow_subset``, as is one that is not a CIFAR batch at all (:func:`_parse`'s error).
  """
  published = OFFICIAL_FILE_MD5.get(fmt.directory)
  if published is None:
    return ("extracted directory: structure and labels checked; the binary version has no "
            "published per-file MD5")
  differ = [(name, md5, published[name]) for name, blob in files.items()
            if (md5 := hashlib.md5(blob).hexdigest()) != published[name]]
  if not differ:
    return f"extracted official files, per-file MD5 verified ({len(files)} files)"
  for name, md5, expected in differ:
    where = portable_path(path / name)
    count = len(_parse(files[name], where, spec, fmt)[1])
    if count == _official_images(fmt, name):
      raise DataError(
          f"{where}: MD5 {md5}, expected {expected} (the official {dataset} file), yet it "
          f"holds the official {count} images: the file is corrupted or modified, not a "
          "subset; restore it from the official archive")
  if not allow_subset:
    name, md5, expected = differ[0]
    more = f"; {len(differ) - 1} more of its {len(files)} files differ" if len(differ) > 1 else ""
    raise DataError(
        f"{portable_path(path / name)}: MD5 {md5}, expected {expected} (the official {dataset} "
        f"file){more}; the files are corrupted, modified or a subset; pass allow_subset=True "
        "(--allow-subset) to train on them")
  return (f"extracted directory, {len(differ)} of {len(files)} files differ from the official "
          "ones (MD5): structure and labels checked")


def _locate(path: pathlib.Path, dataset: str, spec: _Spec) -> tuple[_Format, pathlib.Path]:
  """Finds the archive or extracted directory to read: ``path`` itself, or one inside it."""
  if not path.exists():
    raise DataError(f"{path}: no such file or directory")
  for fmt in spec.formats:
    if path.name == fmt.archive and path.is_file():
      return fmt, path
    if path.name == fmt.directory and path.is_dir():
      return fmt, path
  candidates = [(fmt, fmt.archive) for fmt in spec.formats]
  candidates += [(fmt, fmt.directory) for fmt in spec.formats]
  if path.is_dir():
    for fmt, name in candidates:
      if (path / name).exists():
        return fmt, path / name
    # An extracted directory under another name (say a copy of some of its files): read it
    # when it holds the format's test file(s) itself; the files are checked as usual.
    for fmt in spec.formats:
      if all((path / name).is_file() for name in fmt.test):
        return fmt, path
  raise DataError(
      f"{path}: no {dataset} data found; expected one of "
      f"{', '.join(name for _, name in candidates)} (from "
      f"https://www.cs.toronto.edu/~kriz/cifar.html), the path of one of them, or a directory "
      f"holding an extracted one's files ({', '.join(spec.formats[0].test)}, ...)")


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _verify_archive(path: pathlib.Path, fmt: _Format, allow_subset: bool) -> str:
  """Identifies the archive by size and MD5; returns its description."""
  if not path.is_file():
    raise DataError(f"{path}: not a regular file")
  official = OFFICIAL_ARCHIVES[fmt.archive]
  known = (official, *SUBSET_ARCHIVES.get(fmt.archive, ()))
  size = path.stat().st_size
  if not any(size == k.size for k in known):
    subsets = "".join(f" or {k.size:,} ({k.description})" for k in known[1:])
    raise DataError(
        f"{path}: {size:,} bytes, expected {official.size:,} (the {official.description})"
        f"{subsets}; the file is truncated, corrupted or not a CIFAR archive")
  md5 = _md5(path)
  match = next((k for k in known if k.size == size and k.md5 == md5), None)
  if match is None:
    expected = " or ".join(k.md5 for k in known if k.size == size)
    raise DataError(f"{path}: MD5 {md5}, expected {expected}; the file is corrupted")
  if match is not official and not allow_subset:
    raise DataError(
        f"{path} is the {match.description}, not the full official archive; pass "
        "allow_subset=True (--allow-subset) to train on it")
  return match.description


def _read_file(path: pathlib.Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def _read_archive(path: pathlib.Path, fmt: _Format) -> dict[str, bytes]:
  """Reads the batch files out of a .tar.gz in one streaming pass, without extracting."""
  wanted = {f"{fmt.directory}/{name}": name for name in fmt.train + fmt.test}
  files = {}
  try:
    # "r|gz" streams: random access into a gzip stream would decompress it again per member.
    with tarfile.open(path, "r|gz") as tar:
      for member in tar:
        if member.name in wanted and member.isfile():
          files[wanted[member.name]] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(f"{path}: not a readable .tar.gz archive ({e})") from e
  missing = [member for member, name in wanted.items() if name not in files]
  if missing:
    raise DataError(f"{path}: missing {', '.join(missing)}")
  return files


class _ArrayUnpickler(pickle.Unpickler):
  """Loads plain data and NumPy arrays only: a CIFAR batch needs no other global."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),  # pickled by NumPy 1.x (official archives)
      ("numpy._core.multiarray", "_reconstruct"),  # pickled by NumPy 2.x
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("_codecs", "encode"),  # Python 3 bytes in a protocol-2 pickle
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def _parse(blob: bytes, where: str, spec: _Spec, fmt: _Format) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one batch file into ``uint8 [n, 3072]`` pixel rows and ``[n]`` labels."""
  if fmt.binary:
    record = spec.label_bytes + 3072
    if not blob or len(blob) % record:
      raise DataError(
          f"{where}: {len(blob)} bytes is not a whole number of {record}-byte records "
          f"({spec.label_bytes} label byte(s) + 3072 pixel bytes)")
    rows = np.frombuffer(blob, np.uint8).reshape(-1, record)
    data, labels = rows[:, spec.label_bytes:], rows[:, spec.label_bytes - 1]
  else:
    try:
      batch = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:  # A foreign byte stream can fail in the unpickler in any way.
      raise DataError(f"{where}: not a CIFAR batch pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
      raise DataError(f"{where}: the pickle holds a {type(batch).__name__}, not a CIFAR batch dict")
    # Python 2 pickles (the official ones) and Python 3 bytes keys both decode to str here.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = sorted({"data", spec.label_key} - batch.keys())
    if missing:
      raise DataError(f"{where}: the batch has no {missing} (keys: {sorted(map(str, batch))})")
    data, labels = batch["data"], np.asarray(batch[spec.label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and len(data)):
      shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
      raise DataError(f"{where}: 'data' is {shape}, expected a uint8 array of shape (n, 3072)")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(
          f"{where}: {spec.label_key!r} has shape {labels.shape} and dtype {labels.dtype}, "
          f"expected {len(data)} integers")
  if labels.min() < 0 or labels.max() >= spec.num_classes:
    raise DataError(
        f"{where}: labels span {labels.min()}..{labels.max()}, outside 0..{spec.num_classes - 1}")
  return data, labels
