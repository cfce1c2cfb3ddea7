"""A fresh clone with no data/raw obtains Fashion-MNIST itself: the card's
`git clone ...; pip install -e .; snakemake --cores 2 results/table2.csv` does not stop at
"missing file(s)". Here the data rule of the smoke profile, from a clone of this checkout.
The data come from Debian's dataset-fashion-mnist files or torchvision's download: without
either (offline, no package) the test is skipped and says so."""

import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from snakemake_output import job_counts

from refilled.data import fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fashion_mnist_source(timeout: float = 5.0) -> str | None:
    """Where a fresh clone would get Fashion-MNIST from (as scripts/get_fashion_mnist.sh does):
    Debian's files, else torchvision's download; None where neither is there."""
    if fashion_mnist.DEBIAN_FASHION_MNIST_DIR.is_dir():
        return f"Debian's files in {fashion_mnist.DEBIAN_FASHION_MNIST_DIR}"
    from torchvision.datasets import FashionMNIST

    url = urlsplit(FashionMNIST.mirrors[0])
    try:
        socket.create_connection((url.hostname, url.port or 80), timeout=timeout).close()
    except OSError:
        return None
    return f"torchvision's download from {url.hostname}"


def test_no_source_is_told_apart_from_debian_files_and_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-package")
    monkeypatch.setattr(socket, "create_connection", offline)
    assert fashion_mnist_source() is None
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: socket.socket())
    assert fashion_mnist_source().startswith("torchvision's download from fashion-mnist.")
    (tmp_path / "no-package").mkdir()
    assert fashion_mnist_source() == f"Debian's files in {tmp_path / 'no-package'}"


@pytest.mark.slow
@pytest.mark.network
def test_a_clone_without_data_fetches_fashion_mnist(tmp_path):
    if fashion_mnist_source() is None:
        pytest.skip(f"no network and no {fashion_mnist.DEBIAN_FASHION_MNIST_DIR} (Debian package dataset-fashion-mnist): "
                    "a fresh clone has nowhere to get Fashion-MNIST from")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone / "data" / "raw").exists()
    target = "data/prepared/smoke/fashion-mnist.json"
    dry = subprocess.run([str(BIN / "snakemake"), "-n", target, "--config", "profile=smoke"], cwd=clone,
                         capture_output=True, text=True, timeout=300, check=True)
    assert job_counts(dry.stdout + dry.stderr) == {"prepare_data": 1}   # it obtains the data itself
    run = subprocess.run([str(BIN / "snakemake"), "--cores", "1", target, "--config", "profile=smoke"], cwd=clone,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    files = sorted(p.name for p in (clone / "data" / "raw" / "fashion-mnist").iterdir())
    assert [f.split(".")[0] for f in files] == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    # with the files there, the same invocation has nothing to do (the data rule's inputs do not
    # depend on what lies in data/raw, so the input trigger cannot fire)
    again = subprocess.run([str(BIN / "snakemake"), "-n", target, "--config", "profile=smoke"],
                           cwd=clone, capture_output=True, text=True, timeout=300, check=True)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]
