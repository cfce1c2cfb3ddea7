"""Tiny datasets in the official on-disk formats, for tests (no network, no real data).

Every builder takes the data root (the directory passed to `load_dataset`), writes the
dataset's own folder under it, and returns what it wrote so tests can compare.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0000 08 <ndim> unless overridden)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_maybe_gz(path: Path, data: bytes, gz: bool) -> Path:
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_fashion_idx(root, n_train_per_class: int = 3, n_test_per_class: int = 2, gz: bool = False,
                     seed: int = 0) -> dict:
    """Write the four IDX files to <root>/fashion-mnist/. Pixels are random in 1..255 (never 0)."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "fashion-mnist"
    out: dict = {"dir": directory, "paths": {}}
    for prefix, per_class in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(1, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
        out["paths"][f"{prefix}-images-idx3-ubyte"] = write_maybe_gz(directory / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        out["paths"][f"{prefix}-labels-idx1-ubyte"] = write_maybe_gz(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return out


def cifar_pickle(obj: dict, path: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def make_cifar100(root, n_train_per_class: int = 1, n_test_per_class: int = 1, seed: int = 0,
                  protocol: int = pickle.HIGHEST_PROTOCOL) -> dict:
    """Write train/test/meta pickles to <root>/cifar-100-python/ with the official dict keys."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "cifar-100-python"
    out: dict = {"dir": directory}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        cifar_pickle({
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": [int(x) for x in labels],
            b"coarse_labels": [int(x) // 5 for x in labels],
            b"data": data,
        }, directory / split, protocol)
        out[f"{split}_data"], out[f"{split}_labels"] = data, labels
    out["classes"] = [f"class_{i:03d}" for i in range(100)]
    cifar_pickle({
        b"fine_label_names": [c.encode() for c in out["classes"]],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
    }, directory / "meta", protocol)
    return out


def make_cub(root, n_classes: int = 3, n_train_per_class: int = 2, n_test_per_class: int = 1,
             size: tuple[int, int] = (12, 10)) -> dict:
    """Write a CUB_200_2011 tree (index files + tiny JPEG/PNG images) to <root>/CUB_200_2011/.

    Train and test images are interleaved in id order so the split must come from
    train_test_split.txt. Returns ids, relative paths, 1-based classes and is_train flags.
    """
    from PIL import Image

    directory = Path(root) / "CUB_200_2011"
    (directory / "images").mkdir(parents=True, exist_ok=True)
    classes = [f"{c:03d}.Bird_{c}" for c in range(1, n_classes + 1)]
    rows = []   # (id, relpath, class 1-based, is_train)
    image_id = 0
    for c in range(1, n_classes + 1):
        train_left, test_left, flags = n_train_per_class, n_test_per_class, []
        while train_left or test_left:   # interleave: 1, 0, 1, 0, ...
            if train_left:
                flags.append(1)
                train_left -= 1
            if test_left:
                flags.append(0)
                test_left -= 1
        for j, flag in enumerate(flags):
            image_id += 1
            ext = "jpg" if image_id % 2 else "png"
            rel = f"{classes[c - 1]}/Bird_{c}_{j:04d}.{ext}"
            colour = (37 * c % 256, 91 * j % 256, 13 * image_id % 256)
            (directory / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, colour).save(directory / "images" / rel)
            rows.append((image_id, rel, c, flag))
    (directory / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(classes, 1)))
    (directory / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (directory / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (directory / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    return {"dir": directory, "rows": rows, "classes": classes}


def fashion_with_split(directory, n_train_per_class: int, n_test_per_class: int,
                       classes_per_task: int = 2, ratio: float = 0.5) -> dict:
    """Fake Fashion-MNIST under <directory>/data and a split file made by `refilled split`:
    {"root": data root, "split": split file}, for runs through the command line."""
    from cli_runner import cli

    directory = Path(directory)
    make_fashion_idx(directory / "data", n_train_per_class, n_test_per_class)
    split = directory / "split.json"
    rc, _, err = cli(["split", "--dataset", "fashion-mnist", "--ratio", ratio, "--seed", 0,
                      "--classes-per-task", classes_per_task, "--out", split])
    assert rc == 0, err
    return {"root": directory / "data", "split": split}


def tiny_dataset(n_per_class: int = 12, n_classes: int = 4, seed: int = 0):
    """An in-memory Dataset of random 32x32 images whose brightness depends on the class,
    so a model learns something in a few steps."""
    import torch

    from refilled.data import ArraySplit, Dataset

    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n_classes).repeat_interleave(n)
        images = (torch.rand(len(labels), 3, 32, 32, generator=g) * 80 + labels.view(-1, 1, 1, 1) * 40).to(torch.uint8)
        return ArraySplit(images, labels)

    return Dataset("tiny", [f"c{i}" for i in range(n_classes)], split(n_per_class), split(4),
                   (0.3, 0.3, 0.3), (0.3, 0.3, 0.3))
