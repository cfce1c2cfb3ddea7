"""`refilled prepare-data`: verify a dataset and lay out the data root one workflow profile
reads (the verified files where they are, or a seeded per-class subsample written as IDX)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from refilled.data import dataset_dir, load_dataset
from refilled.data.splits import indices_digest, subsample_per_class
from refilled.io import atomic_write_bytes, write_json


def idx_bytes(array) -> bytes:
    """An IDX file (the MNIST format): magic, dimensions, uint8 data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()


def prepare_data(dataset: str, root: Path, out: Path, test_per_class: int | None, train_per_class: int | None,
                 seed: int, verify_checksums: bool = True) -> dict:
    """Verify `dataset` under `root`; write `out/<dataset>.json` last (and the subsample, if any)."""
    subsample = test_per_class is not None or train_per_class is not None
    if subsample and dataset != "fashion-mnist":
        raise ValueError(f"--test-per-class/--train-per-class are implemented for fashion-mnist only, not {dataset}")
    data = load_dataset(dataset, root, verify_checksums=verify_checksums)   # raises on any problem
    src, dst = dataset_dir(dataset, root), dataset_dir(dataset, out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"dataset": dataset, "source": str(src), "seed": seed,
            "checksums": "verified where known" if verify_checksums else "skipped"}
    if not subsample:
        # nothing to copy: runs read the verified files where they are (--data-root ROOT)
        info.update(kind="verified", path=str(src), data_root=str(root), n_train=len(data.train),
                    n_test=len(data.test))
    else:
        dst.mkdir(parents=True, exist_ok=True)
        kept = {}
        for prefix, part, per_class in (("train", data.train, train_per_class), ("t10k", data.test, test_per_class)):
            name = "test" if prefix == "t10k" else "train"
            labels = part.labels
            keep = subsample_per_class(labels, sorted(set(labels.tolist())), per_class, seed)
            keep = keep.sort().values                      # original order of the file
            images = part.images[keep][:, 0, 2:30, 2:30]  # undo the 32x32 padding: the original 28x28 pixels
            atomic_write_bytes(dst / f"{prefix}-images-idx3-ubyte", idx_bytes(images.numpy()))
            atomic_write_bytes(dst / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels[keep].numpy().astype(np.uint8)))
            for stale in (dst / f"{prefix}-images-idx3-ubyte.gz", dst / f"{prefix}-labels-idx1-ubyte.gz"):
                stale.unlink(missing_ok=True)
            info[f"{name}_per_class"] = per_class
            info[f"n_{name}"] = len(keep)
            info[f"{name}_digest"] = indices_digest(keep)
            kept[prefix] = part.images[keep]
        check = load_dataset(dataset, out, verify_checksums=False)   # read back through the real loader
        if not (torch.equal(check.train.images, kept["train"]) and torch.equal(check.test.images, kept["t10k"])):
            raise ValueError("the prepared images differ from the source images (IDX round trip failed)")
        info.update(kind="subsample", path=str(dst), data_root=str(out))
    write_json(out / f"{dataset}.json", info)
    return info
