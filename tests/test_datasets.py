"""Dataset layer: official formats, error reporting, checksums, check_dataset. No network."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from refilled.data import fashion_mnist
from refilled.data import (
    DATASETS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_SHA256,
    FASHION_MNIST_STD,
    ArraySplit,
    DataError,
    FileImageDataset,
    FileSplit,
    check_dataset,
    cub_transforms,
    dataset_dir,
    format_summary,
    load_dataset,
    obtain_fashion_mnist,
)
from fakedata import FASHION_FILES, cifar_pickle, idx_bytes, make_cifar100, make_cub, make_fashion_idx

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def raises_naming(path, fn, *args, **kwargs) -> str:
    """Assert fn raises DataError whose message names `path`; return the message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


def test_dataset_dirs(tmp_path):
    assert DATASETS == ("fashion-mnist", "cifar100", "cub200")
    assert dataset_dir("fashion-mnist", tmp_path) == tmp_path / "fashion-mnist"
    assert dataset_dir("cifar100", tmp_path) == tmp_path / "cifar-100-python"
    assert dataset_dir("cub200", tmp_path) == tmp_path / "CUB_200_2011"
    with pytest.raises(ValueError):
        dataset_dir("mnist", tmp_path)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_loads_and_pads(tmp_path, gz):
    fake = make_fashion_idx(tmp_path, n_train_per_class=3, n_test_per_class=2, gz=gz)
    ds = load_dataset("fashion-mnist", tmp_path, verify_checksums=False)
    assert ds.name == "fashion-mnist"
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10
    assert ds.mean == FASHION_MNIST_MEAN and ds.std == FASHION_MNIST_STD
    for split, prefix, n in ((ds.train, "train", 30), (ds.test, "t10k", 20)):
        assert isinstance(split, ArraySplit)
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.images.is_contiguous()
        assert split.labels.dtype == torch.int64 and split.labels.shape == (n,)
        assert torch.equal(split.labels, torch.from_numpy(fake[f"{prefix}_labels"].astype(np.int64)))
        im = split.images
        # zero border of 2 px, original pixels (all >= 1) in the centre, 3 identical channels
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert int(im[:, :, border].max()) == 0
        assert torch.equal(im[:, 0, 2:30, 2:30], torch.from_numpy(fake[f"{prefix}_images"]))
        assert torch.equal(im[:, 0], im[:, 1]) and torch.equal(im[:, 0], im[:, 2])


def test_fashion_checksum_mismatch_names_file_and_digests(tmp_path):
    fake = make_fashion_idx(tmp_path, 1, 1, gz=True)
    msg = raises_naming(fake["paths"]["train-images-idx3-ubyte"], load_dataset, "fashion-mnist", tmp_path)
    assert FASHION_MNIST_SHA256["train-images-idx3-ubyte"] in msg
    data = gzip.decompress(fake["paths"]["train-images-idx3-ubyte"].read_bytes())
    import hashlib
    assert hashlib.sha256(data).hexdigest() in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def _fashion_corrupt(tmp_path, kind: str, gz: bool) -> Path:
    """Make a fake Fashion-MNIST with one defect; return the file the error must name."""
    fake = make_fashion_idx(tmp_path, 2, 1, gz=gz)
    d, paths = fake["dir"], fake["paths"]
    if kind == "truncated":
        p = paths["train-images-idx3-ubyte"]
        if gz:   # a truncated gzip stream
            p.write_bytes(p.read_bytes()[:-100])
        else:
            p.write_bytes(p.read_bytes()[:-5])
        return p
    if kind == "truncated_payload":   # valid gzip of a short IDX payload
        p = paths["t10k-images-idx3-ubyte"]
        data = idx_bytes(fake["t10k_images"])[:-28]
        p.write_bytes(gzip.compress(data) if gz else data)
        return p
    if kind == "magic":
        p = paths["train-labels-idx1-ubyte"]
        data = idx_bytes(fake["train_labels"], magic=2051)   # an images magic on a labels file
        p.write_bytes(gzip.compress(data) if gz else data)
        return p
    if kind == "label_range":
        p = paths["t10k-labels-idx1-ubyte"]
        labels = fake["t10k_labels"].copy()
        labels[3] = 10
        data = idx_bytes(labels)
        p.write_bytes(gzip.compress(data) if gz else data)
        return p
    if kind == "count_mismatch":
        p = paths["train-labels-idx1-ubyte"]
        data = idx_bytes(fake["train_labels"][:-1])
        p.write_bytes(gzip.compress(data) if gz else data)
        return p
    if kind == "wrong_dims":
        p = paths["train-images-idx3-ubyte"]
        data = idx_bytes(fake["train_images"][:, :27, :])
        p.write_bytes(gzip.compress(data) if gz else data)
        return p
    if kind == "missing":
        paths["t10k-labels-idx1-ubyte"].unlink()
        return d / "t10k-labels-idx1-ubyte"
    raise AssertionError(kind)


FASHION_DEFECTS = ["truncated", "truncated_payload", "magic", "label_range", "count_mismatch", "wrong_dims", "missing"]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", FASHION_DEFECTS)
def test_fashion_errors_name_the_file(tmp_path, kind, gz):
    bad = _fashion_corrupt(tmp_path, kind, gz)
    msg = raises_naming(bad, load_dataset, "fashion-mnist", tmp_path, verify_checksums=False)
    assert "fashion-mnist" in msg
    expected_words = {"truncated": "truncated" if not gz else "gzip", "truncated_payload": "truncated",
                      "magic": "magic", "label_range": "out of range", "count_mismatch": "disagree",
                      "wrong_dims": "28x28", "missing": "missing"}[kind]
    assert expected_words in msg, msg


def test_obtain_fashion_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-dir")

    def no_network(tmpdir):
        raise OSError("no network")
    monkeypatch.setattr(fashion_mnist, "_download_fashion_mnist_torchvision", no_network)
    msg = raises_naming(tmp_path / "data" / "fashion-mnist" / "train-images-idx3-ubyte",
                        obtain_fashion_mnist, tmp_path / "data")
    assert "apt-get install dataset-fashion-mnist" in msg and "no network" in msg
    assert not (tmp_path / "data" / "fashion-mnist").exists() or not any((tmp_path / "data" / "fashion-mnist").iterdir())


def test_obtain_fashion_copies_verifies_and_repairs(tmp_path, monkeypatch):
    src = make_fashion_idx(tmp_path / "debian", 2, 1, gz=True)
    digests = {b: __import__("hashlib").sha256(gzip.decompress(src["paths"][b].read_bytes())).hexdigest()
               for b in FASHION_FILES}
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SHA256", digests)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", src["dir"])
    called = []
    monkeypatch.setattr(fashion_mnist, "_download_fashion_mnist_torchvision", lambda tmpdir: called.append(1))

    root = tmp_path / "data"
    d = obtain_fashion_mnist(root)
    assert d == root / "fashion-mnist"
    assert sorted(p.name for p in d.iterdir()) == sorted(f"{b}.gz" for b in FASHION_FILES)   # no temp files left
    ds = load_dataset("fashion-mnist", root, verify_checksums=True)
    assert len(ds.train) == 20 and len(ds.test) == 10
    before = snapshot(root)
    obtain_fashion_mnist(root)                      # already there and verified: nothing written
    assert snapshot(root) == before

    # a corrupt plain file shadowing the .gz is replaced, in plain form, with the verified contents
    (d / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    obtain_fashion_mnist(root)
    assert (d / "train-labels-idx1-ubyte").read_bytes() == gzip.decompress(src["paths"]["train-labels-idx1-ubyte"].read_bytes())
    load_dataset("fashion-mnist", root, verify_checksums=True)
    assert not called


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    d = obtain_fashion_mnist(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted(f"{b}.gz" for b in FASHION_FILES)
    summary = check_dataset("fashion-mnist", tmp_path, verify_checksums=True)
    assert summary["checksum"] == "verified" and summary["matches_official_counts"]
    assert (summary["n_train"], summary["n_test"], summary["n_classes"]) == (60000, 10000, 10)
    assert summary["train_per_class_min"] == summary["train_per_class_max"] == 6000
    assert summary["test_per_class_min"] == summary["test_per_class_max"] == 1000
    ds = load_dataset("fashion-mnist", tmp_path, verify_checksums=True)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    # the hardcoded normalisation constants are those of the padded 32x32 training images
    hist = np.bincount(ds.train.images[:, 0].numpy().ravel(), minlength=256).astype(np.float64)
    v = np.arange(256) / 255.0
    mean = (hist * v).sum() / hist.sum()
    std = np.sqrt((hist * (v - mean) ** 2).sum() / hist.sum())
    assert abs(mean - FASHION_MNIST_MEAN[0]) < 1e-4 and abs(std - FASHION_MNIST_STD[0]) < 1e-4
    # and on 28x28 they are the published 0.2860 / 0.3530
    c = ds.train.images[:, 0, 2:30, 2:30].numpy().ravel()
    hist28 = np.bincount(c, minlength=256).astype(np.float64)
    mean28 = (hist28 * v).sum() / hist28.sum()
    assert abs(mean28 - 0.2860) < 1e-4


# ------------------------------------------------------------------------------------------------
# CIFAR-100
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_loads(tmp_path, protocol):
    fake = make_cifar100(tmp_path, n_train_per_class=2, n_test_per_class=1, protocol=protocol)
    ds = load_dataset("cifar100", tmp_path, verify_checksums=False)
    assert ds.classes == fake["classes"]
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    for split, name, n in ((ds.train, "train", 200), (ds.test, "test", 100)):
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.images.is_contiguous()
        assert split.labels.dtype == torch.int64
        assert torch.equal(split.labels, torch.from_numpy(fake[f"{name}_labels"]))
        data = fake[f"{name}_data"]
        # official layout: row = 1024 red, 1024 green, 1024 blue, each row-major 32x32
        assert torch.equal(split.images[5, 1], torch.from_numpy(data[5, 1024:2048].reshape(32, 32)))
        assert torch.equal(split.images.reshape(n, -1), torch.from_numpy(data))


def test_cifar_python2_style_globals(tmp_path):
    """The official pickles were written by Python 2 / numpy 1: arrays refer to numpy.core.multiarray."""
    fake = make_cifar100(tmp_path, 1, 1, protocol=2)
    p = fake["dir"] / "train"
    raw = p.read_bytes()
    assert b"numpy._core.multiarray" in raw
    p.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_dataset("cifar100", tmp_path, verify_checksums=False)
    assert torch.equal(ds.train.images.reshape(100, -1), torch.from_numpy(fake["train_data"]))


def test_cifar_checksum_mismatch(tmp_path):
    from torchvision.datasets import CIFAR100

    make_cifar100(tmp_path)
    d = tmp_path / "cifar-100-python"
    msg = raises_naming(d, load_dataset, "cifar100", tmp_path, verify_checksums=True)
    official = {f: m for f, m in CIFAR100.train_list + CIFAR100.test_list}
    official["meta"] = CIFAR100.meta["md5"]
    assert any(f"{d / f}:" in msg and official[f] in msg for f in official), msg
    assert "expected" in msg and "actual" in msg and "cs.toronto.edu/~kriz/cifar.html" in msg


def _cifar_corrupt(tmp_path, kind: str) -> Path:
    fake = make_cifar100(tmp_path)
    d = fake["dir"]
    if kind == "truncated":
        p = d / "train"
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
        return p
    if kind == "label100":
        labels = [int(x) for x in fake["test_labels"]]
        labels[7] = 100
        return cifar_pickle({b"data": fake["test_data"], b"fine_labels": labels}, d / "test")
    if kind == "shape":
        return cifar_pickle({b"data": fake["train_data"][:, :3000], b"fine_labels": list(fake["train_labels"])}, d / "train")
    if kind == "count":
        return cifar_pickle({b"data": fake["train_data"], b"fine_labels": [int(x) for x in fake["train_labels"][:-1]]}, d / "train")
    if kind == "missing":
        (d / "meta").unlink()
        return d / "meta"
    if kind == "meta":
        return cifar_pickle({b"fine_label_names": [b"a", b"b"]}, d / "meta")
    if kind == "code":   # a pickle that would run code: must be refused, not executed
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch " + str(tmp_path / "pwned"),))
        return cifar_pickle({b"data": Evil(), b"fine_labels": []}, d / "train")
    raise AssertionError(kind)


CIFAR_DEFECTS = ["truncated", "label100", "shape", "count", "missing", "meta", "code"]


@pytest.mark.parametrize("kind", CIFAR_DEFECTS)
def test_cifar_errors_name_the_file(tmp_path, kind):
    bad = _cifar_corrupt(tmp_path, kind)
    msg = raises_naming(bad, load_dataset, "cifar100", tmp_path, verify_checksums=False)
    words = {"truncated": "unpickle", "label100": "out of range", "shape": "3072", "count": "fine_labels",
             "missing": "missing", "meta": "100 class names", "code": "not allowed"}[kind]
    assert words in msg, msg
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------
# CUB-200-2011
# ------------------------------------------------------------------------------------------------


def test_cub_loads_official_split(tmp_path):
    fake = make_cub(tmp_path, n_classes=3, n_train_per_class=2, n_test_per_class=2)
    ds = load_dataset("cub200", tmp_path)
    assert ds.classes == fake["classes"]
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    rows = fake["rows"]
    for split, flag in ((ds.train, 1), (ds.test, 0)):
        assert isinstance(split, FileSplit)
        want = [(fake["dir"] / "images" / rel, c - 1) for _, rel, c, t in sorted(rows) if t == flag]
        assert split.paths == [p for p, _ in want]
        assert split.labels.dtype == torch.int64
        assert split.labels.tolist() == [c for _, c in want]
    assert len(ds.train) == 6 and len(ds.test) == 6
    assert ds.train.labels.min() == 0 and ds.train.labels.max() == 2   # 0-based

    item, label = FileImageDataset(ds.test, cub_transforms(False))[0]
    assert item.shape == (3, 224, 224) and item.dtype == torch.float32 and label == ds.test.labels[0]
    item, _ = FileImageDataset(ds.train, cub_transforms(True))[1]
    assert item.shape == (3, 224, 224)
    raw, _ = FileImageDataset(ds.train, None)[0]
    assert raw.mode == "RGB" and raw.size == (12, 10)


def _cub_corrupt(tmp_path, kind: str) -> Path:
    fake = make_cub(tmp_path)
    d = fake["dir"]
    if kind == "absent":
        p = d / "images" / fake["rows"][2][1]
        p.unlink()
        return p
    if kind == "class_range":
        p = d / "image_class_labels.txt"
        p.write_text(p.read_text().replace("4 2\n", "4 4\n"))
        assert "4 4\n" in p.read_text()
        return p
    if kind == "class_201":
        p = d / "image_class_labels.txt"
        p.write_text(p.read_text().replace("1 1\n", "1 201\n"))
        return p
    if kind == "split_missing_id":
        p = d / "train_test_split.txt"
        p.write_text("".join(line + "\n" for line in p.read_text().splitlines() if not line.startswith("5 ")))
        return p
    if kind == "labels_missing_id":
        p = d / "image_class_labels.txt"
        p.write_text("".join(line + "\n" for line in p.read_text().splitlines() if not line.startswith("2 ")))
        return p
    if kind == "index_missing":
        p = d / "classes.txt"
        p.unlink()
        return p
    if kind == "malformed":
        p = d / "train_test_split.txt"
        p.write_text(p.read_text() + "oops\n")
        return p
    raise AssertionError(kind)


CUB_DEFECTS = ["absent", "class_range", "class_201", "split_missing_id", "labels_missing_id", "index_missing", "malformed"]


@pytest.mark.parametrize("kind", CUB_DEFECTS)
def test_cub_errors_name_the_file(tmp_path, kind):
    bad = _cub_corrupt(tmp_path, kind)
    msg = raises_naming(bad, load_dataset, "cub200", tmp_path)
    words = {"absent": "absent", "class_range": "out of range", "class_201": "out of range",
             "split_missing_id": "image id 5", "labels_missing_id": "image id 2", "index_missing": "missing",
             "malformed": "malformed"}[kind]
    assert words in msg, msg
    assert "CUB-200-2011" in msg


def test_cub_undecodable_image(tmp_path):
    fake = make_cub(tmp_path)
    bad = fake["dir"] / "images" / fake["rows"][0][1]     # a JPEG
    bad.write_bytes(bad.read_bytes()[:40])
    ds = load_dataset("cub200", tmp_path)
    i = ds.train.paths.index(bad)
    with pytest.raises(DataError) as info:
        FileImageDataset(ds.train, cub_transforms(False))[i]
    assert str(bad) in str(info.value)
    raises_naming(bad, check_dataset, "cub200", tmp_path)
    check_dataset("cub200", tmp_path, decode_limit=0)   # structure alone is fine


# ------------------------------------------------------------------------------------------------
# check_dataset
# ------------------------------------------------------------------------------------------------


def test_check_dataset_counts_and_writes_nothing(tmp_path):
    make_fashion_idx(tmp_path, 3, 2, gz=True)
    make_cifar100(tmp_path, 2, 1)
    make_cub(tmp_path, n_classes=4, n_train_per_class=3, n_test_per_class=1)
    before = snapshot(tmp_path)

    s = check_dataset("fashion-mnist", tmp_path, verify_checksums=False)
    assert (s["n_train"], s["n_test"], s["n_classes"]) == (30, 20, 10)
    assert (s["train_per_class_min"], s["train_per_class_max"], s["test_per_class_min"], s["test_per_class_max"]) == (3, 3, 2, 2)
    assert s["checksum"] == "skipped" and s["matches_official_counts"] is False
    assert s["images_decoded"] == 50

    s = check_dataset("cifar100", tmp_path, verify_checksums=False)
    assert (s["n_train"], s["n_test"], s["n_classes"]) == (200, 100, 100)
    assert (s["train_per_class_min"], s["train_per_class_max"]) == (2, 2)

    s = check_dataset("cub200", tmp_path, verify_checksums=True)
    assert (s["n_train"], s["n_test"], s["n_classes"]) == (12, 4, 4)
    assert (s["train_per_class_min"], s["train_per_class_max"], s["test_per_class_min"]) == (3, 3, 1)
    assert s["checksum"] == "unknown for this dataset"
    assert s["images_decoded"] == 16
    assert check_dataset("cub200", tmp_path, decode_limit=2)["images_decoded"] == 4

    text = format_summary(s)
    assert "cub200" in text and "12" in text and "no official checksum" in text
    import json
    json.dumps(s)   # JSON-serialisable
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name,kind", [("fashion-mnist", k) for k in FASHION_DEFECTS]
                         + [("cifar100", k) for k in CIFAR_DEFECTS] + [("cub200", k) for k in CUB_DEFECTS])
def test_check_dataset_raises_on_corruption(tmp_path, name, kind):
    if name == "fashion-mnist":
        bad = _fashion_corrupt(tmp_path, kind, gz=False)
    elif name == "cifar100":
        bad = _cifar_corrupt(tmp_path, kind)
    else:
        bad = _cub_corrupt(tmp_path, kind)
    before = snapshot(tmp_path)
    raises_naming(bad, check_dataset, name, tmp_path, verify_checksums=False)
    assert snapshot(tmp_path) == before


def test_check_dataset_missing_dataset(tmp_path):
    for name in DATASETS:
        with pytest.raises(DataError) as info:
            check_dataset(name, tmp_path)
        assert str(dataset_dir(name, tmp_path)) in str(info.value)
    assert list(tmp_path.iterdir()) == []
