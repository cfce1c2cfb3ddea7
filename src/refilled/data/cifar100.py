"""CIFAR-100: the official python pickles (train, test, meta), read with an unpickler that
refuses every global but numpy's arrays, checked against torchvision's MD5s."""

from __future__ import annotations

import hashlib
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refilled.data.datasets import ArraySplit, Dataset, _error, dataset_dir

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


# The only globals the official CIFAR pickles (and numpy arrays pickled by any numpy/protocol)
# need. Anything else is refused, so a corrupt or hostile file can never run code.
_PICKLE_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core") else module
        if (canonical, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-100 pickle")
        for mod in (canonical, module):   # numpy 2 has numpy._core; numpy 1 only numpy.core
            try:
                return getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cifar100_official_md5() -> dict[str, str]:
    """The official MD5s, as torchvision's CIFAR100 class lists them (train_list, test_list, meta;
    written out here so that loading CIFAR-100 does not import torchvision)."""
    return {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48"}


def _key(k: Any) -> Any:
    return k.decode("latin1") if isinstance(k, bytes) else k


def _read_cifar_pickle(path: Path, root: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1: the official files were written by Python 2 (torchvision reads them the same way).
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise _error("cifar100", root, path, f"cannot read file ({exc})") from exc
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... : truncated or not a CIFAR pickle
        raise _error(
            "cifar100", root, path,
            f"cannot unpickle (truncated or corrupt file): {type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(obj, dict):
        raise _error("cifar100", root, path, f"expected a pickled dict, found {type(obj).__name__}")
    return {_key(k): v for k, v in obj.items()}


def _cifar_split(path: Path, root: Path, n_classes: int) -> ArraySplit:
    d = _read_cifar_pickle(path, root)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise _error("cifar100", root, path, f"missing key b'{key}' (keys: {sorted(map(str, d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _error("cifar100", root, path, f"b'data' must be a uint8 array of shape [N, 3072], found {desc}")
    try:
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _error("cifar100", root, path, f"b'fine_labels' is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise _error(
            "cifar100", root, path,
            f"{data.shape[0]} images but b'fine_labels' has shape {list(labels.shape)}",
        )
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise _error(
            "cifar100", root, path,
            f"{bad.size} fine label(s) out of range 0..{n_classes - 1} "
            f"(first: index {int(bad[0])} = {int(labels[bad[0]])})",
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))   # rows are R(1024) G(1024) B(1024)
    if not images.flags.writeable:
        images = images.copy()
    return ArraySplit(torch.from_numpy(images), torch.from_numpy(labels))


def load_cifar100(root: Path, verify: bool, download: bool) -> Dataset:
    directory = dataset_dir("cifar100", root)
    official = _cifar100_official_md5()   # {"train": md5, "test": md5, "meta": md5}
    if download and not all((directory / f).is_file() for f in official):
        from torchvision.datasets import CIFAR100

        try:
            CIFAR100(str(root), train=True, download=True)
        except Exception as exc:
            raise _error("cifar100", root, directory, f"download failed ({type(exc).__name__}: {exc})") from exc

    missing = [str(directory / f) for f in official if not (directory / f).is_file()]
    if missing:
        raise _error("cifar100", root, ", ".join(missing), "missing file(s)")
    if verify:
        for fname, expected in official.items():
            actual = _md5_file(directory / fname)
            if actual != expected:
                raise _error(
                    "cifar100", root, directory / fname,
                    f"MD5 does not match the official file: expected {expected}, actual {actual}",
                )

    meta_path = directory / "meta"
    meta = _read_cifar_pickle(meta_path, root)
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        found = f"{len(names)} entries" if isinstance(names, list) else repr(type(names).__name__)
        raise _error("cifar100", root, meta_path, f"b'fine_label_names' must list 100 class names, found {found}")
    classes = [_key(n) for n in names]

    train = _cifar_split(directory / "train", root, len(classes))
    test = _cifar_split(directory / "test", root, len(classes))
    return Dataset("cifar100", classes, train, test, CIFAR100_MEAN, CIFAR100_STD)
