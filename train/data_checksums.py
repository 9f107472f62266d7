"""Published checksums of the CIFAR archives and files ``train.data`` accepts (re-exported
there: :data:`OFFICIAL_ARCHIVES`, :data:`OFFICIAL_FILE_MD5`, :data:`SUBSET_ARCHIVES`)."""

from __future__ import annotations

from typing import NamedTuple


class ArchiveChecksum(NamedTuple):
  size: int  # bytes
  md5: str
  description: str


# MD5s as published by the dataset authors on https://www.cs.toronto.edu/~kriz/cifar.html (the
# same as torchvision.datasets.CIFAR10/CIFAR100 use); sizes are the Content-Length those
# servers send, as recorded by torchvision's and Keras's download logs.
OFFICIAL_ARCHIVES: dict[str, ArchiveChecksum] = {
    "cifar-10-python.tar.gz": ArchiveChecksum(
        170_498_071, "c58f30108f718f92721af3b95e74349a", "official CIFAR-10 archive"),
    "cifar-10-binary.tar.gz": ArchiveChecksum(
        170_052_171, "c32a1d4ab5d03f1284b67883e8d87530", "official CIFAR-10 archive"),
    "cifar-100-python.tar.gz": ArchiveChecksum(
        169_001_437, "eb9058c3a382ffc7106e4002c42a8d85", "official CIFAR-100 archive"),
    "cifar-100-binary.tar.gz": ArchiveChecksum(
        168_513_733, "03b5dce01913d631647c71ecec9e9cb8", "official CIFAR-100 archive"),
}

# Per-file MD5s of the extracted python version, as published with the dataset (the lists
# torchvision.datasets.CIFAR10/CIFAR100 check; CIFAR-10's also in ../shared/data/cifar10/MD5SUMS).
# The binary version has no published per-file list.
OFFICIAL_FILE_MD5: dict[str, dict[str, str]] = {
    "cifar-10-batches-py": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar-100-python": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}

_MINI = "cifar10-mini subset (first 817 images of every official batch: 4085 train / 817 test)"
_SAMPLE = ("optax_bm sample (1000 train / 200 test images cut from cifar10-mini by "
           "train/make_sample.py)")

# Real CIFAR archives that are not the full set: accepted only with allow_subset=True.
SUBSET_ARCHIVES: dict[str, tuple[ArchiveChecksum, ...]] = {
    "cifar-10-python.tar.gz": (
        ArchiveChecksum(15_077_220, "6c29b5071bf2644ee70152d7f83c4c4f", _MINI),
        ArchiveChecksum(3_679_674, "114bc608fcb0ac1543bb24debd4adf11", _SAMPLE),
    ),
    "cifar-10-binary.tar.gz": (
        ArchiveChecksum(13_864_748, "8e4917bb9b4bc214b486dca9be61f410", _MINI),
    ),
}
