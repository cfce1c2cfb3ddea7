"""Job phases (refilled.training.phases) and their sum over a run directory (scripts/job_phases.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from refilled.training.phases import PHASES, Phases, process_start_time

ROOT = Path(__file__).resolve().parents[1]


def test_process_start_agrees_with_psutil():
    ours = process_start_time()
    assert ours is not None
    assert abs(ours - psutil.Process().create_time()) < 1.0   # psutil: /proc's btime, whole seconds


def test_a_slot_wait_of_refilled_pin_is_apart_from_startup_and_total(monkeypatch):
    import refilled.training.phases

    monkeypatch.setattr(refilled.training.phases, "_slot_wait", 0.0)
    refilled.training.phases.note_slot_wait(1.5)
    phases = Phases(job_start=time.time() - 2.0)
    phases.end_startup()
    rec = phases.record()
    assert rec["slot_wait"] == 1.5 and 0.5 <= rec["startup"] < 1.0 and 0.5 <= rec["total"] < 1.0


def test_phases_add_up_to_the_total_with_the_rest_in_other():
    phases = Phases(job_start=time.time() - 2.0)
    phases.end_startup()
    with phases("data"):
        time.sleep(0.05)
    phases.add("train", 3.0)
    rec = phases.record()
    assert 2.0 <= rec["startup"] < 3.0 and rec["data"] >= 0.05 and rec["train"] == 3.0
    assert rec["other"] == 0.0   # 3 s of training inside ~2 s of wall time: nothing is left over
    assert rec["startup_measured"] is True
    with pytest.raises(KeyError, match="unknown phase 'other'"):
        phases.add("other", 1.0)


def write_run(runs: Path, bench: Path, name: str, phases: dict, wall: float):
    d = runs / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"fingerprint": {"format": 2}, "phases": phases}))
    (bench / f"{name}.tsv").parent.mkdir(parents=True, exist_ok=True)
    (bench / f"{name}.tsv").write_text(f"s\th:m:s\tmax_rss\n{wall}\t0:00:{int(wall):02d}\t1.0\n")


def test_job_phases_sums_a_run_directory(tmp_path):
    runs, bench = tmp_path / "results/runs/demo", tmp_path / "results/benchmarks/demo"
    a = {"startup": 0.5, "data": 0.1, "teacher": 0.2, "train": 8.0, "evaluation": 0.6, "writing": 0.1,
         "other": 0.5, "total": 10.0, "startup_measured": True}
    b = {"startup": 3.0, "data": 0.0, "teacher": 0.0, "train": 2.0, "evaluation": 0.0, "writing": 0.0,
         "other": 0.0, "total": 5.0, "slot_wait": 4.0, "startup_measured": True}
    write_run(runs, bench, "teachers/t/seed0", a, 10.5)
    write_run(runs, bench, "students/s/r0.4/seed0/kd", b, 9.5)   # 4 s of it waiting for a slot
    (runs / "teachers/t/seed0/.finished").mkdir()
    (runs / "teachers/t/seed0/.finished/summary.json").write_text(json.dumps({"fingerprint": {}, "phases": a}))
    out = tmp_path / "jobs.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/job_phases.py"), str(runs), "--csv", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 training jobs" in proc.stdout
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.split()
            and line.split()[0] in (*PHASES, "total")}
    assert float(rows["train"][0]) == pytest.approx(10.0) and rows["train"][1] == "66.7%"
    assert float(rows["startup"][0]) == pytest.approx(3.5) and float(rows["total"][0]) == pytest.approx(15.0)
    assert "inside training epochs: 66.7%" in proc.stdout
    assert "not counted above: 4.0 s waiting for a free slot" in proc.stdout
    assert "2 jobs): 16.0 s of job wall time less the slot waits, 62.5% inside training epochs" in proc.stdout
    assert len(out.read_text().splitlines()) == 3


def test_job_phases_refuses_a_directory_without_phases(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r/summary.json").write_text(json.dumps({"fingerprint": {}}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/job_phases.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "records its phases" in proc.stderr and "1 runs written before" in proc.stderr


def test_refilled_pin_notes_how_long_it_waited_for_a_slot(tmp_path, monkeypatch):
    import fcntl
    import threading

    import refilled.training.phases
    from refilled.tools.pin import HELD_SLOTS, take_slot

    monkeypatch.setattr(refilled.training.phases, "_slot_wait", 0.0)
    held = open(tmp_path / "cpu0-x1.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)          # another job holds the only slot
    threading.Timer(1.5, held.close).start()                   # ... for 1.5 s
    assert take_slot(tmp_path, ["cpu0-x1"]) == 0
    HELD_SLOTS.pop().close()
    assert 1.0 <= refilled.training.phases._slot_wait < 5.0
