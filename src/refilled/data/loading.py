"""`load_dataset`: the one entry to the three datasets' loaders."""

from __future__ import annotations

from pathlib import Path

from refilled.data.cifar100 import load_cifar100
from refilled.data.cub200 import load_cub200
from refilled.data.datasets import Dataset, _check_name
from refilled.data.fashion_mnist import load_fashion_mnist


def load_dataset(name: str, root: str | Path, verify_checksums: bool = True, download: bool = False) -> Dataset:
    """Load dataset `name` from `root` (the data root, not the dataset's own directory).

    verify_checksums: compare digests of the files with the official ones where they are
    known (Fashion-MNIST: SHA-256 of the decompressed IDX files; CIFAR-100: torchvision's
    MD5s; CUB: none known). Structural checks (sizes, label ranges, index consistency) are
    always made.
    download: fetch missing files first (Fashion-MNIST via `obtain_fashion_mnist`, CIFAR-100
    via torchvision; CUB cannot be fetched automatically).
    """
    root = Path(root).expanduser()
    _check_name(name)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, verify_checksums, download)
    if name == "cifar100":
        return load_cifar100(root, verify_checksums, download)
    return load_cub200(root, verify_checksums, download)
