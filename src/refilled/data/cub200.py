"""CUB-200-2011: the index files and the JPEGs under images/, decoded lazily (PIL) at 224 px
with ImageNet-style transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from refilled.data.datasets import Dataset, FileSplit, _error, dataset_dir
from refilled.data.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CUB_MAX_CLASSES = 200


_CUB_INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _read_cub_index(path: Path, root: Path, int_value: bool) -> dict[int, Any]:
    """Parse '<id> <value>' lines; value kept as a string (path, name) or parsed as int."""
    if not path.is_file():
        raise _error("cub200", root, path, "missing index file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _error("cub200", root, path, f"cannot read file ({exc})") from exc
    out: dict[int, Any] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        try:
            if len(parts) != 2:
                raise ValueError
            key = int(parts[0])
            value = int(parts[1]) if int_value else parts[1].strip()
        except ValueError:
            raise _error("cub200", root, path, f"line {lineno}: malformed, expected '<id> <value>': {line!r}") from None
        if key in out:
            raise _error("cub200", root, path, f"line {lineno}: id {key} listed twice")
        out[key] = value
    if not out:
        raise _error("cub200", root, path, "index file is empty")
    return out


def load_cub200(root: Path, verify: bool, download: bool) -> Dataset:
    # No official checksum is published for CUB-200-2011, so `verify` has nothing to compare.
    directory = dataset_dir("cub200", root)
    if download and not (directory / "images.txt").is_file():
        raise _error("cub200", root, directory, "not present, and CUB-200-2011 cannot be downloaded automatically")

    classes_path = directory / "classes.txt"
    class_names = _read_cub_index(classes_path, root, int_value=False)
    k = len(class_names)
    if k > CUB_MAX_CLASSES or sorted(class_names) != list(range(1, k + 1)):
        raise _error(
            "cub200", root, classes_path,
            f"class ids must be exactly 1..K with K <= {CUB_MAX_CLASSES}; found {k} ids "
            f"from {min(class_names)} to {max(class_names)}",
        )

    images_path = directory / "images.txt"
    labels_path = directory / "image_class_labels.txt"
    split_path = directory / "train_test_split.txt"
    images = _read_cub_index(images_path, root, int_value=False)
    labels = _read_cub_index(labels_path, root, int_value=True)
    is_train = _read_cub_index(split_path, root, int_value=True)

    tables = {images_path: images, labels_path: labels, split_path: is_train}
    for path, table in tables.items():
        for other_path, other in tables.items():
            extra = sorted(set(other) - set(table))
            if extra:
                raise _error(
                    "cub200", root, path,
                    f"image id {extra[0]} (listed in {other_path.name}) is missing"
                    + (f" ({len(extra)} ids missing in all)" if len(extra) > 1 else ""),
                )

    train_paths, train_labels, test_paths, test_labels = [], [], [], []
    image_root = directory / "images"
    for image_id in sorted(images):
        cls = labels[image_id]
        if not 1 <= cls <= k:
            raise _error(
                "cub200", root, labels_path,
                f"image id {image_id}: class id {cls} out of range 1..{k} (classes.txt lists {k} classes)",
            )
        flag = is_train[image_id]
        if flag not in (0, 1):
            raise _error("cub200", root, split_path, f"image id {image_id}: is_train must be 0 or 1, found {flag}")
        rel = Path(images[image_id])
        if rel.is_absolute() or ".." in rel.parts:
            raise _error("cub200", root, images_path, f"image id {image_id}: path {rel} leaves the images folder")
        path = image_root / rel
        if not path.is_file():
            raise _error("cub200", root, path, f"image id {image_id} is listed in {images_path.name} but the file is absent")
        if flag == 1:
            train_paths.append(path)
            train_labels.append(cls - 1)
        else:
            test_paths.append(path)
            test_labels.append(cls - 1)

    classes = [class_names[i] for i in range(1, k + 1)]
    return Dataset(
        "cub200", classes,
        FileSplit(train_paths, torch.tensor(train_labels, dtype=torch.int64)),
        FileSplit(test_paths, torch.tensor(test_labels, dtype=torch.int64)),
        IMAGENET_MEAN, IMAGENET_STD,
    )


def decode_image(path: str | Path):
    """Open and fully decode an image as RGB (PIL). Raises DataError naming the path if it does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")   # convert() forces the full decode inside the `with`
    except Exception as exc:  # OSError (truncated), UnidentifiedImageError, DecompressionBombError, ...
        raise DataError(f"{path}: image does not decode ({type(exc).__name__}: {exc})") from exc


class FileImageDataset(torch.utils.data.Dataset):
    """(transform(image), label) pairs from a FileSplit; images decoded with PIL as RGB."""

    def __init__(self, split: FileSplit, transform: Callable | None = None):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, index: int):
        image = decode_image(self.split.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[index])


def cub_transforms(train: bool):
    """Standard ImageNet-style transforms at 224 px for CUB."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
