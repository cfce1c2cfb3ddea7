"""scripts/chaos.py's bookkeeping, on hand-made directories (the chaos run itself, on the smoke
workflow, is in tests/test_workflow.py): which runs were trained again after they finished,
what counts as identical outputs, and its refusal of bad arguments."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refilled.io import save_tensors, write_csv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "chaos.py"


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chaos = load_chaos()


def test_a_run_logging_an_epoch_after_its_summary_was_seen_counts_as_retrained(tmp_path):
    wf = tmp_path / "wf"
    done, restored, running = (wf / "results" / "runs" / n for n in ("done", "restored", "running"))
    for d in (done, restored / ".finished", running):
        d.mkdir(parents=True)
    log = tmp_path / "epochs.log"
    line = lambda run, epoch: f"{run.resolve()}\t{epoch}\n"
    log.write_text(line(done, 1) + line(restored, 1) + line(running, 1))   # before they finished
    (done / "summary.json").write_text("{}")
    (restored / ".finished" / "summary.json").write_text("{}")            # outputs deleted, archive kept
    finished = chaos.FinishedRuns(wf, log)
    finished.look()
    assert finished.retrained() == {}
    with open(log, "a") as f:
        f.write(line(running, 2) + line(done, 1) + line(restored, 1) + line(restored, 2))
    finished.look()
    assert finished.retrained() == {str(done.resolve()): 1, str(restored.resolve()): 2}


def _run_tree(root: Path, seconds: float, weight: float, table: str) -> Path:
    run = root / "results" / "runs" / "p" / "seed0"
    run.mkdir(parents=True)
    save_tensors(run / "model.pt", {"arch": "a", "state_dict": {"w": torch.full((3,), weight)}})
    write_csv(run / "metrics.csv", [{"epoch": 1, "loss": 0.5, "seconds": seconds}], ["epoch", "loss", "seconds"])
    (root / "results" / "table2.csv").write_text(table)
    (root / "results" / "plots").mkdir()
    (root / "results" / "plots" / "figure1_stage1.csv").write_text("epoch,acc\n1,0.5\n")
    (root / "figures").mkdir()
    (root / "figures" / "figure1.csv").write_text("x\n1\n")
    (root / "figures" / "figure1.png").write_bytes(bytes([seconds > 1]))   # rendered images are not compared
    return root


def test_outputs_are_identical_when_only_the_seconds_and_the_images_differ(tmp_path):
    a = _run_tree(tmp_path / "a", 1.0, 0.25, "t\n1\n")
    b = _run_tree(tmp_path / "b", 9.0, 0.25, "t\n1\n")
    assert chaos.compare(a, b) == []


@pytest.mark.parametrize("change,kind", [(dict(weight=0.25 + 2**-20), "model.pt"), (dict(table="t\n2\n"), "tables")])
def test_a_different_weight_or_table_byte_is_reported(tmp_path, change, kind):
    a = _run_tree(tmp_path / "a", 1.0, 0.25, "t\n1\n")
    b = _run_tree(tmp_path / "b", 1.0, **{"weight": 0.25, "table": "t\n1\n", **change})
    problems = chaos.compare(a, b)
    assert len(problems) == 1 and problems[0].startswith(f"{kind}: "), problems


def test_a_missing_output_is_reported(tmp_path):
    a = _run_tree(tmp_path / "a", 1.0, 0.25, "t\n1\n")
    b = _run_tree(tmp_path / "b", 1.0, 0.25, "t\n1\n")
    (b / "results" / "table1.csv").write_text("t\n")
    assert any("table1.csv" in p for p in chaos.compare(a, b))


@pytest.mark.parametrize("argv,must", [(["--kills", "-1"], "--kills must be >= 0, got -1"),
                                       (["--gap", "5", "2"], "--gap needs 0 <= MIN <= MAX, got 5 2"),
                                       (["--reference", "/nonexistent"], "--reference /nonexistent: no results/")])
def test_bad_arguments_exit_2_naming_the_flag_and_value(tmp_path, argv, must):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and must in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()
