"""Fashion-MNIST: the four official IDX files (plain or .gz), checked against their SHA-256, held
in memory zero-padded to 32x32 and repeated to 3 channels; fetched from Debian's package or
torchvision's mirrors by `obtain_fashion_mnist`."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from refilled.data.datasets import ArraySplit, Dataset, _error, dataset_dir
from refilled.io import atomic_write_bytes

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

# Where the Debian package dataset-fashion-mnist installs the files (module-level so tests can redirect it).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


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


def load_fashion_mnist(root: Path, verify: bool, download: bool) -> Dataset:
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
