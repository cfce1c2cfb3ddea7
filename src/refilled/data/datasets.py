"""Loaders for the three datasets of the REFILLED experiments, in their official on-disk layouts.

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

import gzip
import hashlib
import importlib
import pickle
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from refilled.data.errors import DataError
from refilled.io import atomic_write_bytes

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

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
# SHA-256 of the DECOMPRESSED IDX files (Debian recompresses the .gz, so digests of the .gz differ
# between sources). Computed from /usr/share/datasets/fashion-mnist/*.gz (Debian package
# dataset-fashion-mnist) and cross-checked: (a) 60000/10000 images with exactly 6000/1000 per class,
# mean 0.2860 / std 0.3530 on 28x28 as published; (b) the MD5s of the same decompressed bytes equal
# the "raw" MD5s that older torchvision releases listed for the official files
# (f4a8712d..., 9018921c..., 8181f547..., 15d48437...); (c) several public repositories list
# these same SHA-256 values for the official Zalando files.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Fashion-MNIST is 0.2860 / 0.3530 on the 28x28 images; these are the values for the
# zero-padded 32x32 images, computed once from the real 60000 training images
# (pixel/255, all pixels of all padded images): mean 0.218999832, std 0.331811373.
FASHION_MNIST_MEAN = (0.2190, 0.2190, 0.2190)
FASHION_MNIST_STD = (0.3318, 0.3318, 0.3318)

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CUB_MAX_CLASSES = 200

# Where the Debian package dataset-fashion-mnist installs the files (module-level so tests can redirect it).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------------------------




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
        return _load_fashion_mnist(root, verify_checksums, download)
    if name == "cifar100":
        return _load_cifar100(root, verify_checksums, download)
    return _load_cub200(root, verify_checksums, download)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 2051   # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049   # 0x00000801: unsigned byte, 1 dimension


def _locate_idx(directory: Path, base: str) -> Path | None:
    """The file for `base` in `directory`: the plain file if present, else the .gz, else None."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_bytes(path: Path, root: Path) -> bytes:
    """Bytes of an IDX file, decompressed when its name ends in .gz."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _error("fashion-mnist", root, path, f"cannot read file ({exc})") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _error("fashion-mnist", root, path, f"not a valid gzip file, truncated or corrupt ({exc})") from exc


def _parse_idx(path: Path, data: bytes, kind: str, root: Path) -> np.ndarray:
    """Parse IDX bytes of `kind` "images" ([N, 28, 28]) or "labels" ([N]); read-only uint8 view."""
    expected_magic = _IDX_IMAGES_MAGIC if kind == "images" else _IDX_LABELS_MAGIC
    if len(data) < 4:
        raise _error("fashion-mnist", root, path, f"truncated: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise _error(
            "fashion-mnist", root, path,
            f"wrong IDX magic number {magic} (0x{magic:08x}); an IDX {kind} file starts with {expected_magic}",
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _error("fashion-mnist", root, path, f"truncated: {len(data)} bytes, header needs {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if kind == "images" and dims[1:] != (28, 28):
        raise _error("fashion-mnist", root, path, f"images are {dims[1]}x{dims[2]}, expected 28x28")
    claimed = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != claimed:
        what = "truncated" if len(data) < claimed else "trailing bytes"
        raise _error(
            "fashion-mnist", root, path,
            f"{what}: {len(data)} bytes but the header (dims {list(dims)}) implies {claimed}",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pad_to_32_rgb(images: np.ndarray) -> torch.Tensor:
    """[N, 28, 28] uint8 -> contiguous uint8 [N, 3, 32, 32]: zero border of 2 px, 3 equal channels."""
    out = np.zeros((images.shape[0], 3, 32, 32), dtype=np.uint8)
    out[:, :, 2:30, 2:30] = images[:, None]
    return torch.from_numpy(out)


def _load_fashion_mnist(root: Path, verify: bool, download: bool) -> Dataset:
    if download:
        obtain_fashion_mnist(root)
    directory = dataset_dir("fashion-mnist", root)
    located = {base: _locate_idx(directory, base) for base in FASHION_MNIST_FILES}
    missing = [base for base, p in located.items() if p is None]
    if missing:
        names = ", ".join(f"{directory / b}[.gz]" for b in missing)
        raise _error("fashion-mnist", root, names, "missing file(s)")

    arrays: dict[str, np.ndarray] = {}
    for base, path in located.items():
        assert path is not None
        data = _read_idx_bytes(path, root)
        if verify:
            actual = _sha256(data)
            expected = FASHION_MNIST_SHA256[base]
            if actual != expected:
                raise _error(
                    "fashion-mnist", root, path,
                    f"SHA-256 of the decompressed contents does not match the official file: "
                    f"expected {expected}, actual {actual}",
                )
        arrays[base] = _parse_idx(path, data, "images" if "images" in base else "labels", root)

    splits = []
    for prefix in ("train", "t10k"):
        img_base, lab_base = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        images, labels = arrays[img_base], arrays[lab_base]
        if images.shape[0] != labels.shape[0]:
            raise _error(
                "fashion-mnist", root, f"{located[img_base]} / {located[lab_base]}",
                f"image and label counts disagree: {images.shape[0]} images, {labels.shape[0]} labels",
            )
        bad = np.flatnonzero(labels > 9)
        if bad.size:
            raise _error(
                "fashion-mnist", root, located[lab_base],
                f"{bad.size} label(s) out of range 0..9 (first: index {int(bad[0])} = {int(labels[bad[0]])})",
            )
        splits.append(ArraySplit(_pad_to_32_rgb(images), torch.from_numpy(labels.astype(np.int64))))

    return Dataset("fashion-mnist", list(FASHION_MNIST_CLASSES), splits[0], splits[1],
                   FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _fashion_file_verifies(path: Path | None, base: str) -> bool:
    if path is None:
        return False
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return False
    return _sha256(data) == FASHION_MNIST_SHA256[base]


def _download_fashion_mnist_torchvision(tmpdir: Path) -> Path:
    """Download with torchvision into `tmpdir`; return the folder holding the raw IDX files."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(tmpdir), train=True, download=True)   # download() fetches all four files
    return tmpdir / "FashionMNIST" / "raw"


def _copy_verified_from(source_dir: Path, todo: list[str], directory: Path) -> tuple[list[str], list[str]]:
    """Copy every file of `todo` found in `source_dir` whose decompressed SHA-256 is official.

    Returns (still missing, problems). Each copy is an atomic write; a file already present in
    `directory` (but not verifying) is replaced in its own form (plain or .gz).
    """
    left, problems = [], []
    for base in todo:
        src = _locate_idx(source_dir, base)
        if src is None:
            left.append(base)
            problems.append(f"{source_dir / base}[.gz] not found")
            continue
        try:
            raw = src.read_bytes()
            data = gzip.decompress(raw) if src.suffix == ".gz" else raw
        except (OSError, EOFError, zlib.error) as exc:
            left.append(base)
            problems.append(f"{src}: unreadable ({exc})")
            continue
        actual = _sha256(data)
        if actual != FASHION_MNIST_SHA256[base]:
            left.append(base)
            problems.append(f"{src}: SHA-256 {actual} is not the official {FASHION_MNIST_SHA256[base]}")
            continue
        target = _locate_idx(directory, base) or directory / src.name
        if target.suffix == ".gz":
            payload = raw if src.suffix == ".gz" else gzip.compress(data)
        else:
            payload = data
        atomic_write_bytes(target, payload)
    return left, problems


def obtain_fashion_mnist(root: str | Path) -> Path:
    """Make sure the four official Fashion-MNIST files are in `<root>/fashion-mnist/`; return that dir.

    Files already there whose decompressed SHA-256 is official are kept. The others are copied
    from the Debian package directory (/usr/share/datasets/fashion-mnist) if present, else
    downloaded with torchvision into a temporary directory and copied in. Every copy is
    verified before it is (atomically) written.
    """
    root = Path(root).expanduser()
    directory = dataset_dir("fashion-mnist", root)
    todo = [b for b in FASHION_MNIST_FILES if not _fashion_file_verifies(_locate_idx(directory, b), b)]
    if not todo:
        return directory

    problems: list[str] = []
    if DEBIAN_FASHION_MNIST_DIR.is_dir():
        todo, found = _copy_verified_from(DEBIAN_FASHION_MNIST_DIR, todo, directory)
        problems += found
    else:
        problems.append(f"{DEBIAN_FASHION_MNIST_DIR} does not exist (Debian package dataset-fashion-mnist)")

    if todo:
        with tempfile.TemporaryDirectory(prefix="refilled-fashion-mnist-") as tmp:
            try:
                raw_dir = _download_fashion_mnist_torchvision(Path(tmp))
            except Exception as exc:  # network errors, checksum errors, ... all mean "not available"
                problems.append(f"torchvision download failed ({type(exc).__name__}: {exc})")
            else:
                todo, found = _copy_verified_from(raw_dir, todo, directory)
                problems += found

    if todo:
        raise _error(
            "fashion-mnist", root, ", ".join(str(directory / b) for b in todo),
            "could not obtain verified file(s): " + "; ".join(problems),
        )
    return directory


# ---------------------------------------------------------------------------------------------
# CIFAR-100
# ---------------------------------------------------------------------------------------------

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


def _load_cifar100(root: Path, verify: bool, download: bool) -> Dataset:
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


# ---------------------------------------------------------------------------------------------
# CUB-200-2011
# ---------------------------------------------------------------------------------------------

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


def _load_cub200(root: Path, verify: bool, download: bool) -> Dataset:
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
