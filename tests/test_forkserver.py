"""The fork server (refilled.tools.forkserver): a job run through it is the job a fresh process
runs (same bytes), a job it must not run is run by the client itself, and killing or
signalling the `refilled` command reaches the job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpu_pin import one_cpu  # noqa: F401 (autouse: this module runs on one CPU)
from fakedata import fashion_with_split

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture
def fashion(tmp_path):
    return fashion_with_split(tmp_path, 6, 2)


def teacher_argv(fashion, out: Path, epochs: int = 2) -> list[str]:
    return [str(a) for a in ["train-teacher", "--split", fashion["split"], "--arch", "wrn-10-1", "--data-root",
                             fashion["root"], "--no-checksum", "--epochs", epochs, "--batch-size", 4,
                             "--device", "cpu", "--out", out]]


def job_env(socket_path: Path | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REFILLED_FORKSERVER", "SLURM_JOB_ID")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if socket_path is not None:
        env["REFILLED_FORKSERVER"] = str(socket_path)
    return {**env, **extra}


class RunningServer:
    def __init__(self, tmp_path: Path):
        self.socket = tmp_path / "fs.sock"
        self.log = tmp_path / "fs.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "refilled.serve", "--socket", str(self.socket)],
                                         stdout=log, stderr=subprocess.STDOUT, env=job_env(None))
        deadline = time.monotonic() + 120
        while not self.socket.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the fork server did not listen within 120 s"
            time.sleep(0.1)

    def jobs(self) -> dict[int, list[str]]:
        """pid -> the server's lines about it."""
        out: dict[int, list[str]] = {}
        for m in re.finditer(r"^job (\d+): (.*)$", self.log.read_text(), re.M):
            out.setdefault(int(m.group(1)), []).append(m.group(2))
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def server(tmp_path):
    s = RunningServer(tmp_path)
    yield s
    s.stop()
    assert not s.socket.exists(), "the server leaves no socket behind"


def refilled(argv, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "refilled"), *argv], env=env, capture_output=True, text=True, timeout=600, **kw)


def tensors(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def metrics_without_seconds(run: Path) -> list[str]:
    lines = (run / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("seconds")
    return [",".join(v for i, v in enumerate(line.split(",")) if i != col) for line in lines]


def test_jobs_through_the_server_are_the_job_a_fresh_process_runs(fashion, tmp_path, server):
    fresh = tmp_path / "fresh"
    alone = refilled(teacher_argv(fashion, fresh), job_env(None))
    assert alone.returncode == 0, alone.stderr
    for n in range(3):   # one server, one job after another
        warm = tmp_path / f"warm{n}"
        through = refilled(teacher_argv(fashion, warm), job_env(server.socket))
        assert through.returncode == 0, through.stderr
        assert "did not take" not in through.stderr
        # the job's own output reached the client's streams
        assert through.stdout.strip() and through.stdout.split(":")[-1] == alone.stdout.split(":")[-1]
        # the same training: bytes of the weights, the metrics but their timing column
        assert (warm / "model.pt").read_bytes() == (fresh / "model.pt").read_bytes()
        assert metrics_without_seconds(warm) == metrics_without_seconds(fresh)
        phases = json.loads((warm / "summary.json").read_text())["phases"]
        assert phases["startup_measured"] and phases["train"] > 0
    # each ran in its own child of the server
    jobs = server.jobs()
    assert len(jobs) == 3 and all(lines[0].startswith("refilled train-teacher") and lines[-1] == "exit 0"
                                  for lines in jobs.values()), jobs
    assert "Traceback" not in server.log.read_text()


def test_a_job_whose_import_time_environment_differs_runs_in_the_client(fashion, tmp_path, server):
    out = tmp_path / "run"
    proc = refilled(teacher_argv(fashion, out, epochs=1), job_env(server.socket, OMP_NUM_THREADS="3"))
    assert proc.returncode == 0, proc.stderr
    assert "did not take this job" in proc.stderr and "OMP_NUM_THREADS" in proc.stderr
    assert server.jobs() == {} and (out / "summary.json").exists()


def test_bad_arguments_through_the_server_exit_2_with_the_message(server, tmp_path):
    proc = refilled(["train-teacher", "--epochs", "x"], job_env(server.socket))
    assert proc.returncode == 2
    assert "invalid int value: 'x'" in proc.stderr
    proc = refilled(["split", "--dataset", "fashion-mnist", "--ratio", "7", "--seed", "0", "--classes-per-task", "2",
                     "--out", str(tmp_path / "s.json")], job_env(server.socket))
    assert proc.returncode == 2 and "ratio" in proc.stderr and not (tmp_path / "s.json").exists()


def wait_for_job(server, timeout=120) -> int:
    deadline = time.monotonic() + timeout
    while not server.jobs():
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    return next(iter(server.jobs()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_killing_the_client_kills_its_job(fashion, tmp_path, server):
    client = subprocess.Popen([str(BIN / "refilled"), *teacher_argv(fashion, tmp_path / "run", epochs=5000)],
                              env=job_env(server.socket), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = wait_for_job(server)
    time.sleep(1)
    assert alive(job)
    client.kill()
    client.wait(30)
    deadline = time.monotonic() + 10
    while alive(job):
        assert time.monotonic() < deadline, f"job {job} survived its client: {server.log.read_text()}"
        time.sleep(0.05)


def test_sigterm_to_the_client_reaches_the_job_and_its_status_comes_back(fashion, tmp_path, server):
    client = subprocess.Popen([str(BIN / "refilled"), *teacher_argv(fashion, tmp_path / "run", epochs=5000)],
                              env=job_env(server.socket), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    job = wait_for_job(server)
    time.sleep(1)
    client.send_signal(signal.SIGTERM)
    code = client.wait(60)
    assert code != 0 and not alive(job)
    lines = server.jobs()[job]
    assert lines[-1] == f"exit {code}", (lines, code)


def test_when_snakemake_dies_the_running_job_finishes_and_the_server_then_ends(fashion, tmp_path):
    """The server's parent (Snakemake; here a shell) is SIGKILLed: the job running in the
    server finishes, its client gets its status, and the server takes no new job and ends."""
    sock, log = tmp_path / "fs.sock", tmp_path / "fs.log"
    parent = subprocess.Popen(["bash", "-c", f"{sys.executable} -m refilled.serve --socket {sock} --parent $$ "
                                             f"> {log} 2>&1 & wait"], env=job_env(None))
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert time.monotonic() < deadline and parent.poll() is None, log.read_text() if log.exists() else ""
        time.sleep(0.1)
    out = tmp_path / "run"
    client = subprocess.Popen([str(BIN / "refilled"), *teacher_argv(fashion, out, epochs=30)], env=job_env(sock),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while "job " not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    assert client.wait(600) == 0, client.stderr.read()
    assert (out / "summary.json").exists()
    text = log.read_text()
    assert "Snakemake is gone" in text and re.search(r"^job \d+: exit 0$", text, re.M), text
    deadline = time.monotonic() + 30
    while any(f"-m refilled.serve --socket {sock}" in " ".join(p.cmdline()) for p in _processes()):
        assert time.monotonic() < deadline, "the server did not end after its last job"
        time.sleep(0.1)
    assert not sock.exists()


def _processes():
    import psutil

    for p in psutil.process_iter():
        try:
            p.cmdline()
            yield p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
