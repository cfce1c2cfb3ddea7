"""`--root` may name the dataset's own directory as well as the data root that holds it
(Debian puts Fashion-MNIST's files in /usr/share/datasets/fashion-mnist itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fakedata import make_cifar100, make_cub, make_fashion_idx
from refilled.data import DataError, check_dataset, dataset_dir, load_dataset

REFILLED = Path(sys.executable).parent / "refilled"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
MAKERS = {"fashion-mnist": make_fashion_idx, "cifar100": make_cifar100, "cub200": make_cub}


@pytest.mark.parametrize("name", list(MAKERS))
def test_root_may_be_the_dataset_directory_or_its_parent(tmp_path, name):
    directory = MAKERS[name](tmp_path)["dir"]
    assert dataset_dir(name, tmp_path) == directory
    assert dataset_dir(name, directory) == directory
    via_parent = check_dataset(name, tmp_path, verify_checksums=False)
    via_dir = check_dataset(name, directory, verify_checksums=False)
    assert {**via_dir, "root": None} == {**via_parent, "root": None}
    a, b = load_dataset(name, tmp_path, verify_checksums=False), load_dataset(name, directory, verify_checksums=False)
    assert a.train.labels.tolist() == b.train.labels.tolist() and a.classes == b.classes


def test_a_directory_without_the_files_still_names_the_missing_ones(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="missing file") as exc:
        check_dataset("fashion-mnist", tmp_path / "other", verify_checksums=False)
    assert str(tmp_path / "other" / "fashion-mnist") in str(exc.value)


def test_data_check_command_accepts_the_dataset_directory(tmp_path):
    directory = make_fashion_idx(tmp_path, gz=True)["dir"]
    for root in (tmp_path, directory):
        proc = subprocess.run([str(REFILLED), "data", "check", "--dataset", "fashion-mnist", "--root", str(root),
                               "--no-checksum"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not DEBIAN.is_dir(), reason=f"{DEBIAN} absent (Debian package dataset-fashion-mnist)")
def test_data_check_accepts_debians_directory():
    proc = subprocess.run([str(REFILLED), "data", "check", "--dataset", "fashion-mnist", "--root", str(DEBIAN)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "60000" in proc.stdout
