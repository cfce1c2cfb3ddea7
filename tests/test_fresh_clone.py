"""A fresh clone with no data/raw obtains Fashion-MNIST itself: the card's
`git clone ...; pip install -e .; snakemake --cores 2 results/table2.csv` does not stop at
"missing file(s)". Here the data rule of the smoke profile, from a clone of this checkout."""

import subprocess
import sys
from pathlib import Path

from snakemake_output import job_counts

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_a_clone_without_data_fetches_fashion_mnist(tmp_path):
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
