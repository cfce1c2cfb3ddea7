"""The three datasets of the REFILLED experiments, in their official on-disk layouts: what they
have in common (the types a loader returns, where a dataset lies under the data root, the
error that says how to obtain it). One file per dataset beside this one loads it
(fashion_mnist.py, cifar100.py, cub200.py); `refilled.data.loading.load_dataset` picks the file.

    <root>/fashion-mnist/       the four official IDX files, each plain or .gz
    <root>/cifar-100-python/    train, test, meta (the official python pickles)
    <root>/CUB_200_2011/        images.txt, image_class_labels.txt, train_test_split.txt,
                                classes.txt, images/<path>

Fashion-MNIST and CIFAR-100 are small and held in memory as uint8 [N, 3, 32, 32]
(Fashion-MNIST zero-padded 28 -> 32 and repeated to 3 channels); CUB is a list of files
decoded lazily (`FileImageDataset`). Labels are always the dataset's original class ids,
0-based. Every problem with the files raises `DataError`, whose message names the file,
says what is wrong and how to obtain the dataset. Loading never writes anything unless
`download=True` is passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refilled.data.errors import DataError


DATASETS = ("fashion-mnist", "cifar100", "cub200")

_DIRNAMES = {"fashion-mnist": "fashion-mnist", "cifar100": "cifar-100-python", "cub200": "CUB_200_2011"}

HOW_TO_OBTAIN = {
    "fashion-mnist": (
        "install the Debian package (`apt-get install dataset-fashion-mnist`, files in "
        "/usr/share/datasets/fashion-mnist) and run `refilled data fetch --dataset fashion-mnist --root {root}`, or place the four "
        "official IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte; plain or .gz) from https://github.com/zalandoresearch/fashion-mnist in {dir}"
    ),
    "cifar100": (
        "run `refilled data fetch --dataset cifar100 --root {root}` (needs a network), or download "
        "cifar-100-python.tar.gz (python version) from https://www.cs.toronto.edu/~kriz/cifar.html "
        "and extract it in {root} so that {dir}/train, test and meta exist"
    ),
    "cub200": (
        "download CUB_200_2011.tgz from the Caltech CUB-200-2011 page "
        "(https://www.vision.caltech.edu/datasets/cub_200_2011/) and extract it in {root} so that "
        "{dir}/images.txt exists"
    ),
}


@dataclass
class ArraySplit:
    """A small dataset split held in memory."""

    images: torch.Tensor   # uint8 [N, 3, 32, 32], contiguous
    labels: torch.Tensor   # int64 [N], original class ids

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FileSplit:
    """A split whose images are decoded lazily from files (CUB)."""

    paths: list[Path]
    labels: torch.Tensor   # int64 [N], original class ids (0-based)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Dataset:
    name: str
    classes: list[str]                   # class names indexed by original class id
    train: ArraySplit | FileSplit
    test: ArraySplit | FileSplit
    mean: tuple[float, float, float]     # per-channel normalisation, 0..1 scale
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return name


# Files that mark a directory as the dataset's own: `root` may name that directory itself (e.g.
# Debian's /usr/share/datasets/fashion-mnist) instead of the data root that holds it.
_MARKERS = {
    "fashion-mnist": tuple(f"{b}{gz}" for b in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
                           for gz in ("", ".gz")),
    "cifar100": ("meta",),
    "cub200": ("images.txt",),
}


def dataset_dir(name: str, root: str | Path) -> Path:
    """Directory of dataset `name` for `root`: `root/<dirname>` (root is the data root), or `root`
    itself when it has no such subdirectory but holds the dataset's files."""
    root = Path(root).expanduser()
    nested = root / _DIRNAMES[_check_name(name)]
    if not nested.exists() and any((root / m).is_file() for m in _MARKERS[name]):
        return root
    return nested


def _error(name: str, root: Path, path: Any, problem: str) -> DataError:
    how = HOW_TO_OBTAIN[name].format(root=root, dir=dataset_dir(name, root))
    return DataError(f"{path}: {problem}\nTo obtain {name}: {how}")
