"""Verify a dataset on disk and summarise it (backs `refilled data check`). Writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from refilled.data.cub200 import decode_image
from refilled.data.datasets import ArraySplit, DataError, FileSplit, _error, dataset_dir
from refilled.data.loading import load_dataset

# Sizes of the official releases, reported next to what was found (tiny test copies differ).
OFFICIAL_COUNTS = {
    "fashion-mnist": {"n_train": 60000, "n_test": 10000, "n_classes": 10},
    "cifar100": {"n_train": 50000, "n_test": 10000, "n_classes": 100},
    "cub200": {"n_train": 5994, "n_test": 5794, "n_classes": 200},
}

CHECKSUM_VERIFIED = "verified"
CHECKSUM_SKIPPED = "skipped"
CHECKSUM_UNKNOWN = "unknown for this dataset"


def _per_class(labels: torch.Tensor, n_classes: int) -> tuple[int, int]:
    counts = torch.bincount(labels, minlength=n_classes)
    return int(counts.min()), int(counts.max())


def check_dataset(name: str, root: str | Path, verify_checksums: bool = True,
                  decode_limit: int | None = None) -> dict[str, Any]:
    """Load and verify dataset `name` under `root`; return a JSON-serialisable summary.

    Checks: all files present; checksums where known (Fashion-MNIST SHA-256 of the decompressed
    IDX files, CIFAR-100 MD5; none is published for CUB); file structure; labels in range;
    every image decodes (in-memory datasets are fully parsed on load; for CUB the first
    `decode_limit` images of each split are decoded with PIL, all of them when None).
    Any failure raises DataError naming the file, the problem and how to obtain the dataset.
    """
    root = Path(root).expanduser()
    ds = load_dataset(name, root, verify_checksums=verify_checksums, download=False)
    n_classes = len(ds.classes)

    decoded = 0
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        labels = split.labels
        if labels.dtype != torch.int64 or labels.ndim != 1:
            raise DataError(f"{name} {split_name}: labels must be int64 [N], got {labels.dtype} {list(labels.shape)}")
        if len(labels) == 0:
            raise _error(name, root, dataset_dir(name, root), f"the {split_name} split is empty")
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise _error(name, root, dataset_dir(name, root),
                         f"{split_name} labels span {int(labels.min())}..{int(labels.max())}, "
                         f"outside 0..{n_classes - 1}")
        if isinstance(split, ArraySplit):
            im = split.images
            if im.dtype != torch.uint8 or tuple(im.shape[1:]) != (3, 32, 32) or im.shape[0] != len(labels):
                raise DataError(f"{name} {split_name}: images must be uint8 [N, 3, 32, 32] matching the labels, "
                                f"got {im.dtype} {list(im.shape)}")
            decoded += im.shape[0]
        else:
            assert isinstance(split, FileSplit)
            paths = split.paths if decode_limit is None else split.paths[:max(decode_limit, 0)]
            for path in paths:
                try:
                    decode_image(path)
                except DataError as exc:
                    raise _error(name, root, path, f"image does not decode ({exc.__cause__ or exc})") from exc
            decoded += len(paths)

    official = OFFICIAL_COUNTS[name]
    train_min, train_max = _per_class(ds.train.labels, n_classes)
    test_min, test_max = _per_class(ds.test.labels, n_classes)
    summary: dict[str, Any] = {
        "name": name,
        "root": str(root),
        "path": str(dataset_dir(name, root)),
        "n_train": len(ds.train.labels),
        "n_test": len(ds.test.labels),
        "n_classes": n_classes,
        "train_per_class_min": train_min,
        "train_per_class_max": train_max,
        "test_per_class_min": test_min,
        "test_per_class_max": test_max,
        "checksum": (CHECKSUM_UNKNOWN if name == "cub200"
                     else CHECKSUM_VERIFIED if verify_checksums else CHECKSUM_SKIPPED),
        "images_decoded": decoded,
        "images_total": len(ds.train.labels) + len(ds.test.labels),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "official_counts": dict(official),
    }
    summary["matches_official_counts"] = all(summary[k] == v for k, v in official.items())
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"{s['name']}: OK  ({s['path']})",
        f"  train {s['n_train']} images, {s['train_per_class_min']}..{s['train_per_class_max']} per class",
        f"  test  {s['n_test']} images, {s['test_per_class_min']}..{s['test_per_class_max']} per class",
        f"  classes {s['n_classes']}",
        f"  checksums: {s['checksum']}",
        f"  images decoded: {s['images_decoded']} of {s['images_total']}",
        f"  normalisation mean {tuple(round(x, 4) for x in s['mean'])} std {tuple(round(x, 4) for x in s['std'])}",
    ]
    if s["name"] == "cub200":
        lines[4] += " (no official checksum is published for CUB-200-2011; structure and decoding checked)"
    if not s["matches_official_counts"]:
        o = s["official_counts"]
        lines.append(f"  note: counts differ from the official release "
                     f"({o['n_train']} train / {o['n_test']} test / {o['n_classes']} classes)")
    return "\n".join(lines)
