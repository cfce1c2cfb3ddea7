"""Tests of `refilled pin` (src/refilled/tools/pin.py): GPU slots and CPU pinning through lock files.

- Which GPUs are shared: CUDA_VISIBLE_DEVICES wins when set; an explicit --gpus that
  disagrees with it is a one-line error (exit 2, both numbers named), never a traceback.
- Jobs take free GPU slots: with one slot held by another job, two jobs started together
  get the two other GPUs; with two slots per GPU the first jobs spread over the GPUs; a job
  waits while every slot is taken and takes the one freed. What is checked is the
  CUDA_VISIBLE_DEVICES the pinned command sees, not what pin prints.
- --threads: the pinned command runs with the CPU affinity of a free slot of that many
  cores, and two jobs get disjoint cores.

No GPU is needed: the GPU ids come from CUDA_VISIBLE_DEVICES or --gpus, and the pinned
command is replaced by one that writes what it sees and waits until the test lets it end.
No test here depends on timing: a job that must wait is seen waiting through the line it
prints before it sleeps.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refilled.tools.pin import PinError, count_gpus, gpu_ids, visible_gpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The pinned command: records the CUDA_VISIBLE_DEVICES and CPU affinity it runs with, then
# holds its slots until the file RELEASE exists (the test creates it).
CHILD = r"""
import json, os, sys, time
from pathlib import Path
import refilled.cli as cli

out, release = Path(sys.argv[1]), Path(sys.argv[2])

def pinned(argv):
    seen = {"argv": argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "cpus": sorted(os.sched_getaffinity(0))}
    out.write_text(json.dumps(seen))
    while not release.exists():
        time.sleep(0.05)
    return 0

real_main = cli.main
cli.main = pinned           # what `refilled pin` calls after taking its slots
sys.exit(real_main(sys.argv[3:]))
"""


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)     # a GPU host may set it; each test says what it wants
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class Job:
    """`refilled pin ARGS -- split` in a child process whose pinned command reports and waits."""

    def __init__(self, tmp: Path, name: str, pin_args: list, **env):
        self.seen_file, self.release = tmp / f"{name}.json", tmp / f"{name}.release"
        script = tmp / "child.py"
        if not script.exists():
            script.write_text(CHILD)
        argv = [sys.executable, str(script), str(self.seen_file), str(self.release), "pin", *map(str, pin_args),
                "--", "split", "--dataset", "fashion-mnist"]
        self.proc = subprocess.Popen(argv, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []

    def wait_for_line(self, part: str) -> str:
        """Read stderr until a line containing `part` (or the end: then fail)."""
        for line in self.proc.stderr:
            self.stderr.append(line)
            if part in line:
                return line
        self.proc.wait(timeout=60)
        raise AssertionError(f"no line with {part!r}; rc {self.proc.returncode}, stderr:\n{''.join(self.stderr)}")

    def seen(self) -> dict:
        """What the pinned command saw (waits until it ran: pin prints its choices first)."""
        line = self.wait_for_line("refilled pin:")
        assert "waiting" not in line, f"the job waits for a slot: {line}"
        while not self.seen_file.exists():
            try:
                self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"the job ended (rc {self.proc.returncode}) before its command ran:\n"
                                 + "".join(self.stderr) + self.proc.stderr.read())
        while True:
            try:
                return json.loads(self.seen_file.read_text())
            except json.JSONDecodeError:      # caught mid-write
                continue

    def finish(self) -> int:
        self.release.touch()
        _, err = self.proc.communicate(timeout=120)
        self.stderr.append(err)
        return self.proc.returncode


def _hold(lock_dir: Path, name: str):
    """Take slot `name` as another job would (the lock is held while the file is open)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_dir / f"{name}.lock", "a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


# ------------------------------------------------------------------------------------------------
# which GPUs
# ------------------------------------------------------------------------------------------------


def test_gpu_ids_without_cuda_visible_devices_are_0_to_n_minus_1():
    assert gpu_ids("3", {}) == ["0", "1", "2"]
    assert gpu_ids("0", {}) == []
    assert count_gpus("2", {}) == 2


def test_visible_devices_win_and_an_explicit_count_must_agree():
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}
    assert gpu_ids("auto", env) == ["3", "5"]
    assert gpu_ids("2", env) == ["3", "5"]
    assert count_gpus("auto", env) == 2
    with pytest.raises(PinError) as info:
        gpu_ids("3", env)
    msg = str(info.value)
    assert "--gpus 3" in msg and "CUDA_VISIBLE_DEVICES=3,5" in msg and "2 GPUs visible" in msg, msg
    with pytest.raises(PinError, match=r"--gpus 2 .*CUDA_VISIBLE_DEVICES=0 \(1 GPU visible\)"):
        gpu_ids("2", {"CUDA_VISIBLE_DEVICES": "0"})
    with pytest.raises(PinError, match=r"--gpus 1 .*\(0 GPUs visible\)"):
        gpu_ids("1", {"CUDA_VISIBLE_DEVICES": ""})


def test_cuda_visible_devices_as_cuda_reads_it():
    assert visible_gpus({}) is None
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 1, 2 ,"}) == ["1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]      # -1 hides what follows it
    assert count_gpus("auto", {"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_bad_gpu_counts_are_errors():
    for spec in ("-1", "two"):
        with pytest.raises(PinError, match="--gpus must be"):
            gpu_ids(spec, {})


def test_pin_module_does_not_import_torch():
    """The Snakefile imports count_gpus from refilled.tools.pin: that must stay cheap."""
    code = "import sys, refilled.tools.pin; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_gpu_count_that_disagrees_with_visible_devices_is_a_clean_error(tmp_path):
    """The issue's crash: CUDA_VISIBLE_DEVICES=0 refilled pin --gpus 2 ... raised IndexError."""
    out = tmp_path / "split.json"
    proc = subprocess.run([str(BIN / "refilled"), "pin", "--gpus", "2", "--per-gpu", "1", "--lock-dir",
                           str(tmp_path / "locks"), "--", "split", "--dataset", "fashion-mnist", "--ratio", "0",
                           "--seed", "0", "--classes-per-task", "5", "--out", str(out)],
                          env=_env(CUDA_VISIBLE_DEVICES="0"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("refilled pin: error: --gpus 2 disagrees with CUDA_VISIBLE_DEVICES=0"), lines
    assert "(1 GPU visible)" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# GPU slots
# ------------------------------------------------------------------------------------------------


def test_two_jobs_with_one_slot_held_get_the_two_free_gpus(tmp_path):
    locks = tmp_path / "locks"
    held = _hold(locks, "gpu0-slot0")                  # another job runs on GPU 0
    a = Job(tmp_path, "a", ["--gpus", "3", "--lock-dir", locks])
    seen_a = a.seen()
    b = Job(tmp_path, "b", ["--gpus", "3", "--lock-dir", locks])   # started while a still runs
    seen_b = b.seen()
    assert {seen_a["cuda"], seen_b["cuda"]} == {"1", "2"}, (seen_a, seen_b)
    assert seen_a["argv"] == ["split", "--dataset", "fashion-mnist"]      # the command after '--'
    assert a.finish() == 0 and b.finish() == 0
    held.close()


def test_gpu_ids_come_from_cuda_visible_devices(tmp_path):
    """Visible devices 4,7 (what a batch system hands out): slots are on GPUs 4 and 7, and
    the pinned command sees only its own."""
    locks = tmp_path / "locks"
    held = _hold(locks, "gpu4-slot0")
    a = Job(tmp_path, "a", ["--gpus", "auto", "--lock-dir", locks], CUDA_VISIBLE_DEVICES="4,7")
    assert a.seen()["cuda"] == "7"
    assert a.finish() == 0
    held.close()


def test_slots_per_gpu_spread_the_first_jobs_over_the_gpus(tmp_path):
    locks = tmp_path / "locks"
    a = Job(tmp_path, "a", ["--gpus", "2", "--per-gpu", "2", "--lock-dir", locks])
    seen_a = a.seen()
    b = Job(tmp_path, "b", ["--gpus", "2", "--per-gpu", "2", "--lock-dir", locks])
    seen_b = b.seen()
    assert (seen_a["cuda"], seen_b["cuda"]) == ("0", "1"), (seen_a, seen_b)
    c = Job(tmp_path, "c", ["--gpus", "2", "--per-gpu", "2", "--lock-dir", locks])   # a GPU's second slot
    assert c.seen()["cuda"] == "0"
    assert a.finish() == 0 and b.finish() == 0 and c.finish() == 0


def test_a_job_waits_while_every_gpu_slot_is_taken_and_takes_the_freed_one(tmp_path):
    locks = tmp_path / "locks"
    held0, held1 = _hold(locks, "gpu0-slot0"), _hold(locks, "gpu1-slot0")
    job = Job(tmp_path, "a", ["--gpus", "2", "--lock-dir", locks])
    job.wait_for_line("slots in")                      # printed when all are busy, before it waits
    assert job.proc.poll() is None and not job.seen_file.exists()
    held1.close()                                      # GPU 1 is freed
    assert job.seen()["cuda"] == "1"
    assert job.finish() == 0
    held0.close()


def test_without_gpus_cuda_visible_devices_is_left_alone(tmp_path):
    job = Job(tmp_path, "a", ["--gpus", "0", "--lock-dir", tmp_path / "locks"])
    job.release.touch()                                # nothing to wait for
    assert job.finish() == 0
    assert json.loads(job.seen_file.read_text())["cuda"] is None


# ------------------------------------------------------------------------------------------------
# CPU pinning (--threads, which every training rule passes)
# ------------------------------------------------------------------------------------------------


CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cores = pytest.mark.skipif(len(CORES) < 2, reason="needs CPU affinity and at least 2 cores")


@needs_two_cores
def test_threads_pins_the_command_to_a_free_cpu_slot(tmp_path):
    locks = tmp_path / "locks"
    held = _hold(locks, f"cpu{CORES[0]}-x1")           # another job runs on the first core
    job = Job(tmp_path, "a", ["--gpus", "0", "--threads", "1", "--lock-dir", locks])
    assert job.seen()["cpus"] == [CORES[1]]
    assert job.finish() == 0
    held.close()


@needs_two_cores
def test_two_jobs_get_disjoint_cores(tmp_path):
    locks = tmp_path / "locks"
    a = Job(tmp_path, "a", ["--gpus", "0", "--threads", "1", "--lock-dir", locks])
    cpus_a = a.seen()["cpus"]
    b = Job(tmp_path, "b", ["--gpus", "0", "--threads", "1", "--lock-dir", locks])
    cpus_b = b.seen()["cpus"]
    assert len(cpus_a) == len(cpus_b) == 1 and not set(cpus_a) & set(cpus_b), (cpus_a, cpus_b)
    assert set(cpus_a) | set(cpus_b) <= set(CORES)
    assert a.finish() == 0 and b.finish() == 0


@needs_two_cores
def test_threads_two_takes_two_consecutive_cores(tmp_path):
    job = Job(tmp_path, "a", ["--gpus", "0", "--threads", "2", "--lock-dir", tmp_path / "locks"])
    assert job.seen()["cpus"] == CORES[:2]
    assert job.finish() == 0


def test_without_threads_the_affinity_is_left_alone(tmp_path):
    job = Job(tmp_path, "a", ["--gpus", "0", "--lock-dir", tmp_path / "locks"])
    job.release.touch()
    assert job.finish() == 0
    assert json.loads(job.seen_file.read_text())["cpus"] == CORES


@needs_two_cores
def test_gpu_and_cpu_slots_together(tmp_path):
    locks = tmp_path / "locks"
    held = _hold(locks, "gpu0-slot0")
    job = Job(tmp_path, "a", ["--gpus", "2", "--threads", "1", "--lock-dir", locks])
    seen = job.seen()
    assert seen["cuda"] == "1" and len(seen["cpus"]) == 1
    assert job.finish() == 0
    held.close()


def test_pin_needs_a_command(tmp_path):
    proc = subprocess.run([str(BIN / "refilled"), "pin", "--gpus", "0", "--lock-dir", str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pin needs a refilled command" in proc.stderr and "Traceback" not in proc.stderr
