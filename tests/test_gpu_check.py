"""scripts/gpu_check.sh, the first thing a person with a GPU runs: its training stage and
its CUDA-vs-CPU verdict, exercised on the CPU with tiny official-format Fashion-MNIST
(the stage's commands are the real CLI; the CUDA runs are stood in for by planted
summaries, since this machine has no GPU)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakedata import make_fashion_idx

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_check(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "STAGES": "fmnist", "DEVICES": "cpu", "SEEDS": "0 1",
            "EPOCHS": "1", "PER_CLASS": "8", "TRAIN_ARGS": "--no-checksum", "DATA_ROOT": str(tmp_path / "data"),
            "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=300)


def plant_cuda(run_dir: Path, seed: int, test_acc: float) -> None:
    d = run_dir / f"teacher_cuda_seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"seed": seed, "test_acc": test_acc, "seconds": 1.0}))


@pytest.mark.slow
def test_training_stage_and_verdict(tmp_path):
    make_fashion_idx(tmp_path / "data", n_train_per_class=10, n_test_per_class=4)
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    Fashion-MNIST" in done.stdout
    run_dir = tmp_path / "out" / "fmnist" / "epochs1_per8"
    rows = list(csv.DictReader(open(run_dir / "accuracy.csv")))
    assert [(r["device"], r["seed"]) for r in rows] == [("cpu", "0"), ("cpu", "1")]
    cpu = [float(r["test_acc"]) for r in rows]
    for r in rows:
        summary = json.loads((run_dir / f"teacher_cpu_seed{r['seed']}" / "summary.json").read_text())
        assert summary["data"]["per_class"] == 8 and summary["epochs"] == 1 and summary["device"] == "cpu"

    # CUDA results 30 points below the CPU's: the verdict must say so and the stage fail
    for seed, acc in enumerate(cpu):
        plant_cuda(run_dir, seed, acc - 0.3)
    far = run_check(tmp_path)
    assert far.returncode == 1 and "DIFFERENT" in far.stdout and "FAIL  Fashion-MNIST" in far.stdout
    # ... and the same accuracies: same within seed noise, the CPU runs reused, not retrained
    for seed, acc in enumerate(cpu):
        plant_cuda(run_dir, seed, acc)
    same = run_check(tmp_path)
    assert same.returncode == 0 and "same within seed noise" in same.stdout, same.stdout
    assert same.stdout.count("finished already") == 2

    # a seed not asked for is not compared, whatever an earlier call left behind
    plant_cuda(run_dir, 7, 0.0)
    assert run_check(tmp_path).returncode == 0
    rows = list(csv.DictReader(open(run_dir / "accuracy.csv")))
    assert sorted((r["device"], r["seed"]) for r in rows) == [("cpu", "0"), ("cpu", "1"), ("cuda", "0"), ("cuda", "1")]


def test_missing_data_fails_the_stage_with_instructions(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 1
    assert "Fashion-MNIST not found" in done.stdout and "bring the four IDX files" in done.stdout
