"""Commands that train nothing import neither torch nor torchvision (each would cost seconds per
Snakemake job), and training commands import torchvision only where they use it (CUB, downloads).

Each command runs in a fresh interpreter, which then reports which of the heavy modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fakedata import make_fashion_idx

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from refilled.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print(json.dumps({"rc": rc, "loaded": sorted(m for m in ("torch", "torchvision") if m in sys.modules)}))
"""


def loaded(argv: list, cwd: Path) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("{"), proc.stderr[-3000:]
    report = json.loads(last)
    return report["rc"], report["loaded"]


@pytest.mark.parametrize("argv", [["--help"], ["split", "--help"], ["table", "--help"], ["figure", "--help"],
                                  ["lambda-auc", "--help"]], ids=lambda a: a[0])
def test_help_imports_no_torch(tmp_path, argv):
    rc, mods = loaded(argv, tmp_path)
    assert rc == 0 and mods == []


def test_split_imports_no_torch(tmp_path):
    rc, mods = loaded(["split", "--dataset", "fashion-mnist", "--ratio", "0.6", "--seed", "0", "--out",
                       tmp_path / "s.json"], tmp_path)
    assert rc == 0 and (tmp_path / "s.json").is_file() and mods == []


def test_table_and_figure_modules_import_no_torch(tmp_path):
    code = ("import sys, refilled.report.tables, refilled.report.figures, refilled.experiments.profile, refilled.io, refilled.data.splits, "
            "refilled.training.finished, refilled.tools.pin; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_training_on_fashion_mnist_imports_no_torchvision(tmp_path):
    make_fashion_idx(tmp_path / "raw", n_train_per_class=4, n_test_per_class=2)
    split = tmp_path / "s.json"
    rc, _ = loaded(["split", "--dataset", "fashion-mnist", "--ratio", "0.6", "--seed", "0", "--out", split], tmp_path)
    assert rc == 0
    rc, mods = loaded(["train-teacher", "--split", split, "--arch", "wrn-10-1", "--epochs", "1", "--data-root",
                       tmp_path / "raw", "--no-checksum", "--batch-size", "8", "--device", "cpu",
                       "--out", tmp_path / "t"], tmp_path)
    assert rc == 0 and (tmp_path / "t" / "summary.json").is_file()
    assert "torch" in mods and "torchvision" not in mods
