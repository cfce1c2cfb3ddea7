"""Fault tolerance and bad input (issue 6): every guarantee is checked by injecting its fault.

 1. a training job SIGKILLed mid-run under Snakemake resumes from its last finished epoch and
    ends with the uninterrupted run's weights; finished jobs are not rerun;
 2. a whole `snakemake` killed mid-DAG: after `--unlock`, `--rerun-incomplete` runs only the
    missing jobs, and no table is built before all of its runs exist;
 3. atomic writes: a process killed while writing, or a failed rename, leaves no file that
    looks complete (summary.json, the completion marker, included);
 4. corrupt or missing data: an error naming the file, a non-zero exit, nothing written;
 5. configuration errors stop the workflow before any job, naming the key and the allowed values;
 6. a NaN loss stops the run at once, naming epoch, step and terms; the last resume checkpoint
    stays intact;
 7. a checkpoint carrying a pickled payload is refused and the payload never runs;
 8. a teacher or init checkpoint of another architecture or class count: an error naming both;
 9. disk full (ENOSPC) while saving: the previous checkpoint survives;
 plus `refilled doctor` on a tree with a finished and an incomplete run.

Where another module already checks part of a guarantee, the test here adds what it does not
(see docs/troubleshooting.md). The Snakemake tests run the real workflow in a
temporary copy with the profile `faults`: the smoke profile on the CPU with 3-epoch teacher and
stage-1 runs (so that a run can be killed between epochs) and a two-run Table 4.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_runner import cli, failed
from cpu_pin import one_cpu  # noqa: F401 (autouse: this module runs on one CPU)
from snakemake_output import job_counts
from snakemake_workflow import copy_workflow, started_snakemake_in
import torch
import torch.nn.functional as F
import yaml

from fakedata import (cifar_pickle, fashion_with_split, idx_bytes, make_cifar100, make_cub, make_fashion_idx,
                      tiny_dataset, write_maybe_gz)
from refilled.training.checkpoints import load_model, save_model
from refilled.data.batches import Batches, task_split
from refilled.data.datasets import Dataset
from refilled.io import CheckpointError, load_tensors, read_json, save_tensors, write_csv, write_json
from refilled.methods.base import Method
from refilled.methods.student import Student
from refilled.models import build_model
from refilled.training.step import NonFiniteLoss
from refilled.training.loop import OptimConfig, fit

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REFILLED = BIN / "refilled"
CPU = torch.device("cpu")
ARCH = "wrn-10-1"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def temp_files(root: Path) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*.tmp"))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def as_csv(rows: list[dict]) -> list[dict]:
    """Rows as csv.DictWriter writes them (str of each value), to compare with read_rows."""
    return [{k: str(v) for k, v in r.items()} for r in rows]


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def train_batches(ds: Dataset, seed: int = 3) -> Batches:
    return Batches(task_split(ds.train, list(range(ds.num_classes))), ds, 8, True, CPU, seed)


def fit_tiny(run_dir: Path, method_factory=Student, epochs: int = 3, seed: int = 3, **kw):
    """fit() of wrn-10-1 on the tiny dataset; (method, last row). Same seed -> same run."""
    ds = tiny_dataset()
    torch.manual_seed(seed)
    method = method_factory(build_model(ARCH, ds.num_classes))
    cfg = OptimConfig(epochs=epochs, batch_size=8, lr=0.05)
    last = fit(method, train_batches(ds, seed), lambda: {}, cfg, run_dir, CPU, seed, graph="off", **kw)
    return method, last


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture
def fashion(tmp_path):
    """Fake Fashion-MNIST (official format, random pixels) and a 2-class split; for CLI runs."""
    made = fashion_with_split(tmp_path, 6, 2)
    return {**made, "data": json.loads(made["split"].read_text())}


def train_args(fashion, out: Path, epochs: int = 2, arch: str = ARCH) -> list:
    return ["--split", fashion["split"], "--arch", arch, "--data-root", fashion["root"], "--no-checksum",
            "--epochs", epochs, "--batch-size", 4, "--device", "cpu", "--out", out]


class WriteHook:
    """A file object whose write() is `write`; everything else goes to the real file."""

    def __init__(self, f, write):
        self._f, self.write = f, write

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FullDisk:
    """os.fdopen replacement: the `nth` atomic write whose temporary file is named .NAME.*.tmp
    writes half its bytes, then fails with ENOSPC, as a full disk does."""

    def __init__(self, name: str, nth: int = 1):
        self.name, self.nth, self.seen, self.real = name, nth, 0, os.fdopen

    def __call__(self, fd, *args, **kwargs):
        f = self.real(fd, *args, **kwargs)
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) if isinstance(fd, int) else ""
        if not (target.startswith(f".{self.name}.") and target.endswith(".tmp")):
            return f
        self.seen += 1
        if self.seen != self.nth:
            return f
        def write(data):
            f.write(data[:len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return WriteHook(f, write)


# ------------------------------------------------------------------------------------------------
# Snakemake in a temporary copy of the workflow
# ------------------------------------------------------------------------------------------------


def faults_profile() -> dict:
    """The smoke profile, on the CPU, with teacher and stage-1 runs of 3 epochs and a small Table 4."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg.update(description="faults: smoke on the CPU, 3-epoch teacher and stage 1 (tests/test_faults.py)",
               device="cpu", gpus=0, threads=1, train_per_class=40)
    t2 = cfg["experiments"]["table2"]
    t2["teacher"].update(arch=ARCH, per_class=40, epochs=3)
    t2.update(per_class=40, stage1_epochs=3)
    cfg["table4"] = {"experiment": "table2", "method": "stage1", "arch": ARCH, "ratios": [0.6], "k_hats": [1, "inf"]}
    return cfg


@pytest.fixture
def wf(tmp_path):
    """A copy of the workflow with the faults and faultsref profiles, data/raw -> the real data."""
    dst = copy_workflow(tmp_path / "wf", {name: faults_profile() for name in ("faults", "faultsref")})
    (tmp_path / "tmp").mkdir()     # TMPDIR of the jobs: `refilled pin` keeps its slot locks there
    return dst


def sm_env(wf: Path) -> dict:
    e = env()
    e["TMPDIR"] = str(wf.parent / "tmp")
    return e


def snakemake(wf: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), *map(str, args)]
    return subprocess.run(cmd, cwd=wf, env=sm_env(wf), capture_output=True, text=True, timeout=timeout)


def sm_ok(proc: subprocess.CompletedProcess) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{text[-5000:]}"
    return text


def descendants(pid: int) -> dict[int, list[str]]:
    """{pid: argv} of every live descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                argv = (Path("/proc") / str(child) / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            found[child] = argv
            todo.append(child)
    return found


def started_snakemake(wf: Path, *args):
    return started_snakemake_in(wf, args, sm_env(wf), wf.parent / "snakemake-killed.log")


def wait_for(condition, proc: subprocess.Popen, wf: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("snakemake ended or hung before the moment to kill it:\n"
                                 + (wf.parent / "snakemake-killed.log").read_text()[-4000:])
        time.sleep(0.002)


def wait_gone(pids, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} survived SIGKILL"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


TEACHER = "results/runs/{profile}/teachers/table2/seed0"
STAGE1 = "results/runs/faults/students/table2/r0.6/wrn-10-1/seed0"


# ------------------------------------------------------------------------------------------------
# 1. a training job killed with SIGKILL mid-run, under Snakemake
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_training_job_resumes_under_snakemake_to_the_uninterrupted_result(wf):
    run = wf / TEACHER.format(profile="faults")
    target = f"{TEACHER.format(profile='faults')}/summary.json"
    with started_snakemake(wf, target, "--cores", 1, "--config", "profile=faults") as proc:
        wait_for(lambda: (run / "resume.pt").exists(), proc, wf)
        teacher_job = lambda a: "train-teacher" in a or ("--task" in a[:-1] and a[a.index("--task") + 1] == "teacher")
        jobs = {p: a for p, a in descendants(proc.pid).items() if teacher_job(a)}   # either spelling of the command
        assert len(jobs) == 1, jobs
        os.kill(next(iter(jobs)), signal.SIGKILL)       # the training process only: Snakemake sees it fail
        assert proc.wait(timeout=120) != 0
    assert not (run / "summary.json").exists() and not (run / "model.pt").exists()
    state = load_tensors(run / "resume.pt")
    assert 1 <= state["epoch"] < 3, "killed after epoch 1 and before the end"
    rows_at_kill = as_csv(state["rows"])
    upstream = snapshot(wf / "data")                    # prepare_data and split: finished jobs

    text = sm_ok(snakemake(wf, target, "--cores", 1, "--config", "profile=faults"))
    assert job_counts(text) == {"teacher": 1}, "only the killed job runs again"
    assert snapshot(wf / "data") == upstream, "finished jobs are never rerun"
    rows = read_rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # the finished epochs come from the checkpoint, timings included: resumed, not restarted
    assert rows[:len(rows_at_kill)] == rows_at_kill
    assert not (run / "resume.pt").exists() and not temp_files(run)

    # the same job, never interrupted (another profile name: its own run directory)
    ref = wf / TEACHER.format(profile="faultsref")
    sm_ok(snakemake(wf, f"{TEACHER.format(profile='faultsref')}/summary.json", "--cores", 1,
                    "--config", "profile=faultsref"))
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop(rows) == drop(read_rows(ref / "metrics.csv"))
    assert_same_weights(load_tensors(run / "model.pt")["state_dict"], load_tensors(ref / "model.pt")["state_dict"])
    a, b = read_json(run / "summary.json"), read_json(ref / "summary.json")
    assert (a["train_acc"], a["test_acc"]) == (b["train_acc"], b["test_acc"])

    text = sm_ok(snakemake(wf, target, "--cores", 1, "--config", "profile=faults", "-n"))
    assert "Nothing to be done" in text


# ------------------------------------------------------------------------------------------------
# 2. the whole snakemake killed mid-DAG
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_snakemake_reruns_only_the_missing_jobs_and_builds_tables_from_complete_runs(wf):
    args = ["results/table4.csv", "--cores", 1, "--config", "profile=faults"]
    stage1 = wf / STAGE1
    with started_snakemake(wf, *args) as proc:
        wait_for(lambda: any(stage1.glob("stage1_k*/resume.pt")), proc, wf)   # a stage-1 job is past epoch 1
        pids = list(descendants(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)             # Snakemake and every job it started
        proc.wait(timeout=60)
    wait_gone(pids)

    killed = next(stage1.glob("stage1_k*/resume.pt")).parent
    assert not (killed / "summary.json").exists()
    teacher = wf / TEACHER.format(profile="faults")
    assert (teacher / "summary.json").exists()
    assert not list((wf / "results").glob("table4*")), "no table from a partial set of runs"
    rows_at_kill = as_csv(load_tensors(killed / "resume.pt")["rows"])
    finished = {**snapshot(wf / "data"), **snapshot(teacher)}       # prepare_data, splits, teacher
    everything = snapshot(wf / "results")

    # a plain rerun stops: the killed job's outputs are marked incomplete (nothing is touched)
    proc2 = snakemake(wf, *args)
    text = proc2.stdout + proc2.stderr
    assert proc2.returncode != 0 and "--rerun-incomplete" in text and str(killed.relative_to(wf)) in text, text[-3000:]
    # with --rerun-incomplete it stops at the lock the killed snakemake left
    proc3 = snakemake(wf, *args, "--rerun-incomplete")
    assert proc3.returncode != 0 and "--unlock" in proc3.stdout + proc3.stderr, (proc3.stdout + proc3.stderr)[-3000:]
    assert snapshot(wf / "results") == everything
    # what docs/troubleshooting.md says to do
    sm_ok(snakemake(wf, *args, "--unlock"))
    text = sm_ok(snakemake(wf, *args, "--rerun-incomplete"))

    counts = job_counts(text)
    trained = counts.pop("stage1", 0) + counts.pop("train", 0)      # the training rule, by either name
    assert (trained, counts) == (2, {"table4": 1}), "the killed stage-1 job, the missing one, the table"
    assert {**snapshot(wf / "data"), **snapshot(teacher)} == finished, "finished jobs are never rerun"
    rows = read_rows(killed / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:len(rows_at_kill)] == rows_at_kill, "the killed job resumed from its checkpoint"
    long = read_rows(wf / "results" / "table4_long.csv")
    summaries = sorted(str(p.relative_to(wf)) for p in stage1.glob("stage1_k*/summary.json"))
    assert sorted(r["summary"] for r in long) == summaries and len(summaries) == 2
    table_time = (wf / "results" / "table4.csv").stat().st_mtime_ns
    assert all((wf / s).stat().st_mtime_ns <= table_time for s in summaries), "table built after all its runs"
    assert "Nothing to be done" in sm_ok(snakemake(wf, *args, "-n"))


# ------------------------------------------------------------------------------------------------
# 3. atomic writes
# ------------------------------------------------------------------------------------------------


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import torch
    from refilled.io import save_tensors, write_json

    real = os.fdopen

    class Stalling:                     # every write stops half-way; the parent kills us there
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            print("WRITING", flush=True)
            time.sleep(120)

    os.fdopen = lambda fd, *a, **k: Stalling(real(fd, *a, **k))

    if sys.argv[1] == "json":
        write_json(sys.argv[2], {"kind": "new", "pad": "x" * 1_000_000})
    else:
        save_tensors(sys.argv[2], {"epoch": 2, "w": torch.ones(1000, 1000)})
""")


@pytest.mark.parametrize("kind,name,exists", [("json", "summary.json", False), ("json", "summary.json", True),
                                              ("tensors", "resume.pt", True), ("tensors", "model.pt", False)])
def test_process_killed_while_writing_leaves_no_file_that_looks_complete(tmp_path, kind, name, exists):
    run = tmp_path / "run"
    run.mkdir()
    target = run / name
    if exists:
        (write_json if kind == "json" else save_tensors)(target, {"kind": "old"} if kind == "json" else {"epoch": 1})
    before = target.read_bytes() if exists else None
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, kind, str(target)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p.name for p in run.iterdir() if p.name != name]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{name}.") and leftovers[0].endswith(".tmp"), leftovers
    assert (run / leftovers[0]).stat().st_size > 0, "the kill did happen mid-write"
    if exists:
        assert target.read_bytes() == before, "the previous file is untouched"
    else:
        assert not target.exists(), "no partial file under the final name"
    # what later steps look at: the completion marker and the run's state
    from refilled.tools.doctor import scan_runs

    finished, incomplete, temps = scan_runs(tmp_path)
    assert (run in finished) == (name == "summary.json" and exists)
    assert [str(t) for t in temps] == [str(run / leftovers[0])]


@pytest.mark.parametrize("writer", ["write_json", "write_csv", "save_tensors"])
def test_failed_rename_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, writer):
    import refilled.io as rio

    write = {"write_json": lambda p, v: write_json(p, {"v": v}),
             "write_csv": lambda p, v: write_csv(p, [{"v": v}], ["v"]),
             "save_tensors": lambda p, v: save_tensors(p, {"v": torch.tensor(v)})}[writer]
    old, new = tmp_path / "old.out", tmp_path / "new.out"
    write(old, 1)
    before = old.read_bytes()

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "simulated I/O error on rename")

    monkeypatch.setattr(rio.os, "replace", broken_replace)
    for path in (old, new):
        with pytest.raises(OSError, match="simulated"):
            write(path, 2)
    monkeypatch.undo()
    assert old.read_bytes() == before and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.out"], "no temporary file is left"


@pytest.mark.slow
def test_summary_json_is_written_last_and_only_for_a_complete_run(fashion, tmp_path, monkeypatch):
    """Disk full while writing summary.json, the completion marker: no summary.json, the run
    stays resumable, and the rerun finishes it without training again."""
    import refilled.training.loop as train_mod
    from refilled.training.run import RunSpec, train

    train_teacher = lambda spec: train(spec, "student", task="teacher")   # what train-teacher runs

    out = tmp_path / "run"
    spec = lambda: RunSpec(split=fashion["split"], arch=ARCH, out=out, epochs=2, data_root=fashion["root"],
                           verify_checksums=False, batch_size=4, device="cpu")
    monkeypatch.setattr(os, "fdopen", FullDisk("summary.json"))
    with pytest.raises(OSError) as info:
        train_teacher(spec())
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert not (out / "summary.json").exists() and not temp_files(out)
    assert (out / "model.pt").exists() and load_tensors(out / "resume.pt")["epoch"] == 2
    rows = read_rows(out / "metrics.csv")
    from refilled.tools.doctor import run_state, scan_runs

    finished, incomplete, _ = scan_runs(tmp_path)
    assert finished == [] and [s.path for s in incomplete] == [out] and run_state(out).last_epoch == 2

    epochs_trained = []
    real = train_mod._train_epoch
    monkeypatch.setattr(train_mod, "_train_epoch", lambda *a, **k: epochs_trained.append(1) or real(*a, **k))
    summary = train_teacher(spec())
    assert epochs_trained == [], "both epochs were finished: the rerun only writes model.pt and summary.json"
    assert read_rows(out / "metrics.csv") == rows and read_json(out / "summary.json") == json.loads(json.dumps(summary))
    assert not (out / "resume.pt").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}   # not .finished/ (links)
    assert mtimes["summary.json"] >= max(mtimes.values()), "summary.json is written last"


# ------------------------------------------------------------------------------------------------
# 4. corrupt or missing data
# ------------------------------------------------------------------------------------------------


def _corrupt(tmp_path: Path, case: str) -> tuple[str, Path, Path, str, bool]:
    """(dataset, data root, the bad file, words of the message, verify checksums)."""
    root = tmp_path / "data"
    if case == "truncated CIFAR pickle":
        make_cifar100(root)
        bad = root / "cifar-100-python" / "train"
        bad.write_bytes(bad.read_bytes()[:5000])
        return "cifar100", root, bad, "unpickle", False
    if case == "CIFAR wrong checksum":
        make_cifar100(root)                        # fake files: their MD5s are not the official ones
        return "cifar100", root, root / "cifar-100-python" / "train", "MD5 does not match", True
    if case == "Fashion-MNIST wrong checksum":
        fake = make_fashion_idx(root, 3, 2)
        return "fashion-mnist", root, fake["paths"]["train-images-idx3-ubyte"], "SHA-256", True
    if case == "CUB image listed but absent":
        fake = make_cub(root, n_classes=4)
        bad = fake["dir"] / "images" / fake["rows"][2][1]
        bad.unlink()
        return "cub200", root, bad, "absent", False
    if case == "Fashion-MNIST label out of range":
        fake = make_fashion_idx(root, 3, 2)
        labels = fake["train_labels"].copy()
        labels[5] = 10
        bad = write_maybe_gz(fake["dir"] / "train-labels-idx1-ubyte", idx_bytes(labels), False)
        return "fashion-mnist", root, bad, "out of range 0..9", False
    if case == "CIFAR label out of range":
        fake = make_cifar100(root)
        labels = [int(x) for x in fake["test_labels"]]
        labels[3] = 100
        bad = cifar_pickle({b"data": fake["test_data"], b"fine_labels": labels}, fake["dir"] / "test")
        return "cifar100", root, bad, "out of range 0..99", False
    if case == "CUB label out of range":
        fake = make_cub(root, n_classes=4)
        bad = fake["dir"] / "image_class_labels.txt"
        bad.write_text(bad.read_text().replace("3 1\n", "3 9\n"))
        return "cub200", root, bad, "out of range 1..4", False
    raise AssertionError(case)


DATA_FAULTS = ["truncated CIFAR pickle", "CIFAR wrong checksum", "Fashion-MNIST wrong checksum",
               "CUB image listed but absent", "Fashion-MNIST label out of range", "CIFAR label out of range",
               "CUB label out of range"]


@pytest.mark.parametrize("case", DATA_FAULTS)
def test_corrupt_data_stops_every_command_naming_the_file_and_writes_nothing(tmp_path, case):
    """test_datasets.py checks the loaders' messages; here: the commands that write outputs."""
    from refilled.data.splits import make_split

    dataset, root, bad, words, verify = _corrupt(tmp_path, case)
    split = tmp_path / "split.json"
    write_json(split, make_split(dataset, 0.5, 0, 2))
    check = [] if verify else ["--no-checksum"]
    before = snapshot(tmp_path)
    outs = {"train-teacher": tmp_path / "run", "prepare-data": tmp_path / "prepared", "ncm": tmp_path / "ncm.json"}
    commands = {
        "train-teacher": ["train-teacher", "--split", split, "--arch", ARCH, "--data-root", root, *check,
                          "--epochs", 1, "--device", "cpu", "--out", outs["train-teacher"]],
        "prepare-data": ["prepare-data", "--dataset", dataset, "--root", root, "--out", outs["prepare-data"], *check],
        "ncm": ["ncm", "--split", split, "--random-init", ARCH, "--data-root", root, *check, "--device", "cpu",
                "--out", outs["ncm"]],
    }
    for name, argv in commands.items():
        err = failed(cli(argv))
        assert str(bad) in err and words in err, f"{name}: {err}"
        assert not outs[name].exists(), f"{name} wrote {outs[name]}"
    assert snapshot(tmp_path) == before, "nothing written, nothing changed"


@pytest.mark.slow
def test_corrupt_data_exit_status_of_the_installed_command(tmp_path):
    dataset, root, bad, words, _ = _corrupt(tmp_path, "truncated CIFAR pickle")
    out = tmp_path / "prepared"
    proc = subprocess.run([REFILLED, "prepare-data", "--dataset", dataset, "--root", root, "--out", out,
                           "--no-checksum"], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and words in proc.stderr and not out.exists()


# ------------------------------------------------------------------------------------------------
# 5. configuration errors
# ------------------------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(cfg):
        *keys, last = path.split(".")
        node = cfg
        for k in keys:
            node = node[k]
        node[last] = value
    return edit


# what tests/test_workflow.py::BAD does not cover yet
BAD_PROFILES = {
    "negative teacher epochs": (_set("experiments.table2.teacher.epochs", -1),
                                ["experiments.table2.teacher.epochs", "-1 is less than the minimum of 1"]),
    "zero stage-2 epochs": (_set("experiments.table1.stage2_epochs", 0),
                            ["experiments.table1.stage2_epochs", "0 is less than the minimum of 1"]),
    "unknown teacher arch": (_set("experiments.table2.teacher.arch", "resnet-18"),
                             ["experiments.table2.teacher.arch", "'resnet-18'", "wrn-<depth>-<width>",
                              "mobilenet-<width>"]),
    "WRN depth not 6n+4": (_set("experiments.table2.students", ["wrn-12-1"]),
                           ["experiments.table2.students[0]", "'wrn-12-1'", "6n+4"]),
    "unknown dataset": (_set("experiments.table1.dataset", "imagenet"),
                        ["experiments.table1.dataset", "'imagenet' is not one of", "fashion-mnist", "cifar100",
                         "cub200"]),
    "unknown method in a table": (_set("experiments.table2.methods", ["student", "fitnets"]),
                                  ["experiments.table2.methods[1]", "'fitnets' is not one of", "'student'", "'refilled'"]),
    "unknown experiment key": (_set("experiments.table2.method", ["student"]),
                               ["unknown key(s) 'method'", "experiments.table2", "allowed:", "stage1_epochs"]),
    "ratio h does not divide (Table 4)": (_set("table4.ratios", [0.3]),
                                          ["table4", "ratio 0.3", "classes_per_task 5"]),
    "ratio list of the wrong type": (_set("experiments.table2.ratios", "all"),
                                     ["experiments.table2.ratios", "'all' is not of type 'array'"]),
    "unknown figure arch": (_set("figure3.arch", "vgg-16"), ["figure3", "unknown architecture 'vgg-16'"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_bad_profile_stops_the_workflow_naming_the_key_and_allowed_values(wf, case):
    edit, must = BAD_PROFILES[case]
    cfg = faults_profile()
    edit(cfg)
    (wf / "config" / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wf, "all", "-n", "--config", "profile=bad")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config/bad.yaml" in text
    for m in must:
        assert m in text, f"{m!r} not in:\n{text[-3000:]}"
    assert "Job stats" not in text


@pytest.mark.slow
def test_bad_profile_stops_before_any_job_runs(wf):
    cfg = faults_profile()
    _set("experiments.table2.teacher.epochs", -3)(cfg)
    (wf / "config" / "bad.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(wf)
    proc = snakemake(wf, "all", "--cores", 1, "--config", "profile=bad")
    assert proc.returncode != 0 and "experiments.table2.teacher.epochs" in proc.stdout + proc.stderr
    assert not (wf / "results").exists() and not (wf / "data" / "prepared").exists()
    assert not (wf / "data" / "splits").exists()
    assert {k: v for k, v in snapshot(wf).items() if not k.startswith(".snakemake")} == before


@pytest.mark.parametrize("argv,must", [
    (["train-baseline", "--method", "kd"], ["--method", "invalid choice: 'kd'", "student", "rkd", "aml"]),
    (["train-stage2", "--teacher", "t.pt", "--init", "i.pt", "--variant", "refilled+"],
     ["--variant", "invalid choice: 'refilled+'", "refilled-minus", "refilled-emb"]),
    (["train-teacher", "--schedule", "linear"], ["--schedule", "invalid choice: 'linear'", "multistep", "cosine"]),
    (["train-teacher", "--epochs", "ten"], ["--epochs", "invalid int value: 'ten'"]),
])
def test_command_line_errors_name_the_option_and_allowed_values(tmp_path, capsys, argv, must):
    from refilled.cli import main

    out = tmp_path / "run"
    base = ["--split", tmp_path / "s.json", "--arch", ARCH, "--epochs", 1, "--out", out]
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in [*argv[:1], *base, *argv[1:]]])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for m in must:
        assert m in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag,value,must", [
    ("--arch", "resnet-18", ["unknown architecture 'resnet-18'", "accepted forms", "wrn-40-2"]),
    ("--epochs", -1, ["epochs must be >= 1, got -1"]),
])
def test_bad_run_settings_stop_before_anything_is_written(fashion, tmp_path, flag, value, must):
    out = tmp_path / "run"
    argv = train_args(fashion, out)
    argv[argv.index(flag) + 1] = value
    err = failed(cli(["train-teacher", *argv]))
    for m in must:
        assert m in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 6. numerical faults
# ------------------------------------------------------------------------------------------------


class NaNAt(Method):
    """Cross-entropy whose loss is NaN at the `at`-th call (1-based); counts its calls. No extra
    state, so its checkpoint loads into a plain Student (cross-entropy)."""

    name = "ce"

    def __init__(self, student, at: int):
        super().__init__(student)
        self.at, self.calls = at, 0

    def loss(self, x, y):
        self.calls += 1
        logits = self.student(x).logits
        ce = F.cross_entropy(logits.float(), y)
        return logits, {"ce": ce * float("nan") if self.calls == self.at else ce}


@pytest.mark.parametrize("check_every", [1, None])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, check_every):
    """tests/test_step.py checks the message and the metrics rows; here also: how soon it stops,
    and that resume.pt is intact, i.e. resuming from it gives the uninterrupted run.

    check_every=None is fit's default, REFILLED_NAN_CHECK_EVERY (50): with 6 steps an epoch
    only the end-of-epoch check would fire, so the interval is set to 2 here; a NaN at step 3
    must then stop the run at step 4, before the end of the epoch (step 6)."""
    monkeypatch.setenv("REFILLED_NAN_CHECK_EVERY", "2")
    steps = len(train_batches(tiny_dataset()))
    assert steps >= 6, "the NaN step and the check after it must come before the end-of-epoch check"
    run = tmp_path / "nan"
    made = []
    factory = lambda student: made.append(NaNAt(student, at=steps + 3)) or made[-1]   # epoch 2, step 3
    with pytest.raises(NonFiniteLoss) as info:
        fit_tiny(run, factory, check_every=check_every)
    msg = str(info.value)
    assert "non-finite loss at epoch 2, step 3: ce=nan" in msg and "epoch 1) is kept" in msg, msg
    assert (info.value.epoch, info.value.step, list(info.value.terms)) == (2, 3, ["ce"])
    interval = 1 if check_every == 1 else 2
    stopped_at = made[0].calls - steps                 # the step of epoch 2 after which the run stopped
    assert 3 <= stopped_at < 3 + interval, f"stopped after step {stopped_at}, not within {interval} of step 3"
    assert [int(r["epoch"]) for r in read_rows(run / "metrics.csv")] == [1]
    state = load_tensors(run / "resume.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["method"].values()
                                       if v.is_floating_point())
    assert not temp_files(run)

    # intact: resuming from it ends where a run that never saw a NaN ends
    resumed, _ = fit_tiny(run, check_every=check_every)
    straight, _ = fit_tiny(tmp_path / "straight", check_every=check_every)
    assert_same_weights(resumed.state_dict(), straight.state_dict())


def test_nan_check_interval_comes_from_the_environment_of_each_run(monkeypatch):
    """REFILLED_NAN_CHECK_EVERY is read when a run starts, not at import: the fork server
    (refilled.tools.forkserver) imports refilled.training.loop long before it knows a job's environment."""
    import refilled.training.loop

    monkeypatch.delenv("REFILLED_NAN_CHECK_EVERY", raising=False)
    assert refilled.training.loop.nan_check_every() == 50
    for value in ("7", "3"):
        monkeypatch.setenv("REFILLED_NAN_CHECK_EVERY", value)
        assert refilled.training.loop.nan_check_every() == int(value)


@pytest.mark.slow
def test_diverging_run_stops_with_epoch_step_and_terms_through_the_command(fashion, tmp_path):
    out = tmp_path / "run"
    argv = [REFILLED, "train-teacher", *map(str, train_args(fashion, out)), "--lr", "1e30"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss at epoch 1, step" in last and "ce=" in last, proc.stderr[-2000:]
    assert not (out / "summary.json").exists() and not (out / "model.pt").exists()


# ------------------------------------------------------------------------------------------------
# 6b. SIGTERM (Slurm preemption, scancel, requeue): stop, keep the last epoch's checkpoint, fail
# ------------------------------------------------------------------------------------------------


def test_sigterm_mid_epoch_keeps_the_last_epochs_checkpoint_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """SIGTERM delivered during a step of epoch 2: the run stops after that step with exit status
    143, epoch 2 is abandoned (metrics.csv and resume.pt are epoch 1's), the handler that was
    there before comes back, and resuming ends on the uninterrupted run's weights."""
    import refilled.training.step
    import refilled.training.loop

    steps = len(train_batches(tiny_dataset()))
    real, calls = refilled.training.step.TrainStep.step, []

    def step_then_sigterm(self, x, y):
        calls.append(1)
        out = real(self, x, y)
        if len(calls) == steps + 2:                       # epoch 2, step 2 of `steps`
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    def before(signum, frame):                            # what a caller had; fit must not reach it
        raise AssertionError("SIGTERM went to the caller's handler, not to the training loop's")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(refilled.training.step.TrainStep, "step", step_then_sigterm)
        previous = signal.signal(signal.SIGTERM, before)
        try:
            with pytest.raises(SystemExit) as info:
                fit_tiny(run)
            handler_after = signal.getsignal(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, previous)
    assert info.value.code == refilled.training.loop.TERMINATED_EXIT == 143
    assert len(calls) == steps + 2, f"{len(calls) - steps - 2} steps ran after SIGTERM"
    assert handler_after is before, "fit must put back the handler it found"
    assert [int(r["epoch"]) for r in read_rows(run / "metrics.csv")] == [1]
    assert load_tensors(run / "resume.pt")["epoch"] == 1 and not temp_files(run)

    resumed, _ = fit_tiny(run)
    straight, _ = fit_tiny(tmp_path / "straight")
    assert_same_weights(resumed.state_dict(), straight.state_dict())


def test_a_run_killed_after_its_last_epoch_puts_back_the_metrics_snakemake_deleted(fashion, tmp_path, monkeypatch):
    """Killed after the last epoch's checkpoint and before model.pt: Snakemake deletes the failed
    job's declared outputs, metrics.csv among them, and resume.pt stays. The job started again has
    no epoch left to train; it must write metrics.csv back from the checkpoint (before this, the
    run failed reading it for its validation epoch: found by scripts/chaos.py)."""
    import refilled.training.run
    import refilled.training.loop

    out = tmp_path / "run"
    argv = ["train", "--method", "student", *train_args(fashion, out), "--val-per-class", 1]
    with monkeypatch.context() as m:
        m.setattr(refilled.training.run, "save_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            cli(argv)
    rows = read_rows(out / "metrics.csv")
    assert load_tensors(out / "resume.pt")["epoch"] == 2 and not (out / "summary.json").exists()
    (out / "metrics.csv").unlink()                      # what Snakemake does to a failed job's outputs

    trained, real = [], refilled.training.loop._train_epoch
    monkeypatch.setattr(refilled.training.loop, "_train_epoch", lambda *a, **k: trained.append(1) or real(*a, **k))
    rc, _, err = cli(argv)
    assert rc == 0, err
    assert trained == [] and read_rows(out / "metrics.csv") == rows
    assert read_json(out / "summary.json")["val_selected"]["epoch"] in (1, 2)


def sigterm_fashion(tmp_path: Path) -> dict:
    """Fake Fashion-MNIST with enough images that an epoch of wrn-10-1 takes a fraction of a second."""
    return fashion_with_split(tmp_path, 100, 4)


@pytest.mark.slow
def test_sigterm_to_the_training_command_stops_it_within_seconds_and_the_resumed_run_is_exact(tmp_path):
    """A real `refilled train-teacher` gets SIGTERM as soon as its first epoch is checkpointed:
    it exits with 143 within a few seconds, writes no model.pt or summary.json, leaves the
    checkpoint of its last finished epoch (matching metrics.csv), and the same command run again
    resumes from it to the weights and metrics of a run never interrupted."""
    data = sigterm_fashion(tmp_path)
    epochs = 6
    command = lambda out: [REFILLED, "train-teacher", *map(str, train_args(data, out, epochs=epochs))]
    run = tmp_path / "run"
    proc = subprocess.Popen(command(run), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "resume.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or hung before epoch 1"
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 143, f"exit {proc.returncode}\n{err[-3000:]}"
    assert took < 10, f"{took:.1f} s from SIGTERM to exit"
    assert "SIGTERM" in err and "run the same command again to resume" in err, err[-2000:]
    assert not (run / "summary.json").exists() and not (run / "model.pt").exists() and not temp_files(run)
    state = load_tensors(run / "resume.pt")
    rows_at_kill = read_rows(run / "metrics.csv")
    assert 1 <= state["epoch"] < epochs and [int(r["epoch"]) for r in rows_at_kill] == list(range(1, state["epoch"] + 1))
    assert as_csv(state["rows"]) == rows_at_kill

    again = subprocess.run(command(run), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    straight = subprocess.run(command(tmp_path / "straight"), env=env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    rows = read_rows(run / "metrics.csv")
    assert rows[:len(rows_at_kill)] == rows_at_kill, "resumed from the checkpoint, not started over"
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop(rows) == drop(read_rows(tmp_path / "straight" / "metrics.csv"))
    assert_same_weights(load_tensors(run / "model.pt")["state_dict"],
                        load_tensors(tmp_path / "straight" / "model.pt")["state_dict"])


# ------------------------------------------------------------------------------------------------
# 7. untrusted checkpoints
# ------------------------------------------------------------------------------------------------


def _evil(path: Path, marker: Path, kind: str) -> Path:
    payload = Payload(marker)
    if kind == "model":
        obj = {"arch": ARCH, "num_classes": 2, "classes": [0, 1], "state_dict": {}, "x": payload}
    else:
        obj = {"fingerprint": payload, "epoch": 1, "rows": [], "method": {}, "optimizer": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_checkpoint_with_a_pickled_payload_is_refused_everywhere(tmp_path):
    """tests/test_cli.py checks teacher and ncm --model files; here: the loaders, resume.pt, doctor."""
    from refilled.tools.doctor import run_state

    marker = tmp_path / "pwned"
    model = _evil(tmp_path / "model.pt", marker, "model")
    resume = _evil(tmp_path / "run" / "resume.pt", marker, "resume")
    for load in (lambda: load_tensors(model), lambda: load_model(model), lambda: load_tensors(resume),
                 lambda: fit_tiny(resume.parent, epochs=1)):
        with pytest.raises(CheckpointError, match="refusing"):
            load()
        assert not marker.exists(), "the payload ran"
    assert run_state(resume.parent).error is not None and not marker.exists()
    # the payload is live: an unrestricted load runs it (so the checks above can fail)
    torch.load(model, weights_only=False)["x"].close()
    assert marker.exists()


def test_planted_resume_and_init_checkpoints_are_refused_by_the_commands(fashion, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    resume = _evil(out / "resume.pt", marker, "resume")
    before = snapshot(out)
    err = failed(cli(["train-teacher", *train_args(fashion, out)]))
    assert str(resume) in err and "refusing" in err
    assert snapshot(out) == before and not marker.exists()

    teacher = tmp_path / "teacher.pt"
    save_model(teacher, build_model(ARCH, 2), ARCH, fashion["data"]["teacher_classes"])
    init = _evil(tmp_path / "init.pt", marker, "model")
    out2 = tmp_path / "run2"
    err = failed(cli(["train-stage2", *train_args(fashion, out2), "--teacher", teacher, "--init", init,
                      "--variant", "refilled"]))
    assert str(init) in err and "refusing" in err
    assert not out2.exists() and not marker.exists()


# ------------------------------------------------------------------------------------------------
# 8. teacher / init checkpoints that do not match
# ------------------------------------------------------------------------------------------------


def test_model_file_mismatch_names_both_sides(tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, build_model(ARCH, 3), ARCH, [0, 1, 2])
    with pytest.raises(CheckpointError) as info:
        load_model(path, arch="wrn-16-1")
    assert str(path) in str(info.value) and ARCH in str(info.value) and "wrn-16-1" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_model(path, num_classes=5)
    assert str(path) in str(info.value) and "3 classes" in str(info.value) and "5 were requested" in str(info.value)
    # weights of another network under this architecture's name
    liar = tmp_path / "liar.pt"
    save_tensors(liar, {**load_tensors(path), "state_dict": build_model("wrn-16-1", 3).state_dict()})
    with pytest.raises(CheckpointError, match=f"{liar}: weights do not fit {ARCH}"):
        load_model(liar)


@pytest.mark.parametrize("which", ["teacher", "init"])
def test_checkpoint_with_another_class_count_is_refused_by_the_commands(fashion, tmp_path, which):
    """tests/test_cli.py checks an init of another architecture and a teacher of other classes."""
    classes = fashion["data"]
    teacher, init = tmp_path / "teacher.pt", tmp_path / "init.pt"
    save_model(teacher, build_model(ARCH, 2), ARCH, classes["teacher_classes"])
    save_model(init, build_model(ARCH, 2), ARCH, classes["student_classes"])
    wrong = teacher if which == "teacher" else init
    save_model(wrong, build_model(ARCH, 3), ARCH, [0, 1, 2])
    out = tmp_path / "run"
    err = failed(cli(["train-stage2", *train_args(fashion, out), "--teacher", teacher, "--init", init,
                      "--variant", "refilled"]))
    assert str(wrong) in err and "has 3 classes but 2 were requested" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 9. disk full while saving
# ------------------------------------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import refilled.training.loop as train_mod

    run = tmp_path / "run"
    monkeypatch.setattr(os, "fdopen", FullDisk("resume.pt", nth=2))    # epoch 2's checkpoint
    with pytest.raises(OSError) as info:
        fit_tiny(run)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert not temp_files(run), "the half-written temporary file is removed"
    state = load_tensors(run / "resume.pt")
    assert state["epoch"] == 1 and len(state["rows"]) == 1

    epochs_trained = []
    real = train_mod._train_epoch
    monkeypatch.setattr(train_mod, "_train_epoch", lambda *a, **k: epochs_trained.append(1) or real(*a, **k))
    resumed, _ = fit_tiny(run)                                     # space again: resumes after epoch 1
    monkeypatch.undo()
    assert len(epochs_trained) == 2
    straight, _ = fit_tiny(tmp_path / "straight")
    assert_same_weights(resumed.state_dict(), straight.state_dict())


# ------------------------------------------------------------------------------------------------
# refilled doctor
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def sick_tree(tmp_path):
    """A repository with a DVC remote, data, one finished and one incomplete run, and debris."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n"
                                          "    url = ../../remote\n")
    (tmp_path / "remote").mkdir()
    make_fashion_idx(repo / "data" / "raw", 3, 2)
    runs = repo / "results" / "runs" / "p"
    done = runs / "teachers" / "t" / "seed0"
    write_csv(done / "metrics.csv", [{"epoch": 1}, {"epoch": 2}], ["epoch"])
    write_json(done / "summary.json", {"kind": "teacher"})
    half = runs / "students" / "s" / "seed0" / "stage1_kinf"
    write_csv(half / "metrics.csv", [{"epoch": e} for e in (1, 2, 3)], ["epoch"])
    save_tensors(half / "resume.pt", {"fingerprint": {"optim": {"epochs": 5}, "seed": 0}, "epoch": 2, "rows": []})
    (half / ".summary.json.x1y2.tmp").write_text('{"kind": ')        # a killed write
    return {"repo": repo, "done": done, "half": half, "remote": tmp_path / "remote"}


def doctor(repo: Path, *extra) -> tuple[int, str]:
    from refilled.tools.doctor import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--repo", str(repo), *map(str, extra)])
    return rc, out.getvalue()


def lines(text: str, status: str, topic: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{status:<4}  {topic}")]


def test_doctor_reports_versions_device_data_remote_and_the_incomplete_run(sick_tree):
    repo = sick_tree["repo"]
    before = snapshot(repo.parent)
    rc, text = doctor(repo)
    assert rc == 0, text
    versions = lines(text, "ok", "versions")[0]
    for pkg in ("python", "torch", "torchvision", "snakemake", "dvc", "refilled"):
        assert f"{pkg} " in versions, versions
    assert torch.__version__.split("+")[0] in versions
    assert lines(text, "info", "device") or lines(text, "ok", "device")
    assert "CUDA" in text
    assert any("fashion-mnist: files present" in x for x in lines(text, "ok", "data"))
    assert any("cifar100: absent" in x for x in lines(text, "info", "data"))
    assert any("cub200: absent" in x for x in lines(text, "info", "data"))
    dvc = lines(text, "ok", "dvc")
    assert dvc and "reachable" in dvc[0] and str(sick_tree["remote"]) in dvc[0]
    assert any("1 finished, 1 incomplete" in x for x in lines(text, "warn", "runs"))
    incomplete = [x for x in lines(text, "warn", "runs") if "incomplete:" in x]
    assert len(incomplete) == 1 and str(sick_tree["half"]) in incomplete[0]
    assert "last finished epoch 2 of 5 (resume.pt)" in incomplete[0]
    assert str(sick_tree["done"]) not in text
    assert ".summary.json.x1y2.tmp" in text
    assert snapshot(repo.parent) == before, "doctor writes nothing"


def test_doctor_reports_the_image_cache_and_a_killed_decode(sick_tree, tmp_path, monkeypatch):
    cache = tmp_path / "image-cache"
    monkeypatch.setenv("REFILLED_CACHE_DIR", str(cache))
    rc, text = doctor(sick_tree["repo"])
    assert rc == 0 and any(f"{cache}: 0 split(s)" in x for x in lines(text, "info", "cache")), text
    cache.mkdir()
    (cache / "images_256px_0123456789abcdef.pt").write_bytes(b"x" * 3_000_000)
    (cache / ".images_256px_fedcba9876543210.pt.k3j2.tmp").write_bytes(b"x" * 1_000_000)
    rc, text = doctor(sick_tree["repo"])
    assert rc == 0 and any(f"{cache}: 1 split(s), 4.0 MB" in x for x in lines(text, "info", "cache")), text
    warn = lines(text, "warn", "cache")
    assert len(warn) == 1 and "1 temporary file(s) left by a killed decode" in warn[0]
    assert ".images_256px_fedcba9876543210.pt.k3j2.tmp" in text


def test_doctor_exit_status_says_whether_something_is_broken(sick_tree, tmp_path):
    repo, remote = sick_tree["repo"], sick_tree["remote"]
    # a dataset only partly there
    (repo / "data" / "raw" / "cifar-100-python").mkdir()
    (repo / "data" / "raw" / "cifar-100-python" / "meta").write_bytes(b"x")
    rc, text = doctor(repo)
    assert rc == 1 and any("cifar100: only partly present" in x and "train, test" in x for x in lines(text, "FAIL", "data"))
    shutil.rmtree(repo / "data" / "raw" / "cifar-100-python")
    # --verify: the fake Fashion-MNIST files fail their checksums
    rc, text = doctor(repo, "--verify")
    assert rc == 1 and any("fashion-mnist: verification failed" in x for x in lines(text, "FAIL", "data"))
    assert "SHA-256" in text
    # the remote: missing (warn), not a directory (FAIL), not local (not checked)
    remote.rmdir()
    rc, text = doctor(repo)
    assert rc == 0 and any("does not exist yet" in x for x in lines(text, "warn", "dvc"))
    remote.write_text("")
    rc, text = doctor(repo)
    assert rc == 1 and any("not a directory" in x for x in lines(text, "FAIL", "dvc"))
    (repo / ".dvc" / "config.local").write_text("['remote \"local\"']\n    url = s3://bucket/refilled\n")
    rc, text = doctor(repo)
    assert rc == 0 and any("not checked" in x for x in lines(text, "info", "dvc"))
    # a resume.pt that does not load (here: a pickled payload, which must not run)
    marker = tmp_path / "pwned"
    _evil(sick_tree["half"] / "resume.pt", marker, "resume")
    rc, text = doctor(repo)
    assert rc == 1 and any(str(sick_tree["half"]) in x and "does not load" in x for x in lines(text, "FAIL", "runs"))
    assert not marker.exists()


def test_doctor_lists_what_a_killed_snakemake_left(sick_tree):
    repo = sick_tree["repo"]
    meta = repo / ".snakemake"
    (meta / "locks").mkdir(parents=True)
    (meta / "locks" / "0.output.lock").write_text("x\n")
    (meta / "incomplete").mkdir()
    output = "results/runs/p/students/s/seed0/stage1_kinf/metrics.csv"
    (meta / "incomplete" / base64.urlsafe_b64encode(output.encode()).decode()).write_text("")
    rc, text = doctor(repo)
    assert rc == 0
    assert any("--unlock" in x for x in lines(text, "warn", "snakemake"))
    assert any("--rerun-incomplete" in x for x in lines(text, "warn", "snakemake"))
    assert output in text


def test_doctor_help_says_what_the_exit_status_means(capsys):
    import argparse

    from refilled.tools.doctor import add_doctor_parser

    parser = argparse.ArgumentParser(prog="refilled")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["doctor", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: refilled doctor")
    assert "exit status:" in out and "0  nothing is broken" in out and "1  at least one FAIL" in out
    args = parser.parse_args(["doctor", "--runs", "x"])
    assert args.func.__name__ == "cmd_doctor" and args.runs == Path("x")


def test_doctor_is_a_refilled_subcommand(sick_tree, capsys):
    from refilled.cli import main

    rc = main(["doctor", "--repo", str(sick_tree["repo"])])
    assert rc == 0 and "1 finished, 1 incomplete" in capsys.readouterr().out
