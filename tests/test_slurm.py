"""The cluster path, on a real one-node Slurm (scripts/slurm_local.sh), and a finished run that
outlives the Snakemake process that started it.

 1. A subset of the smoke DAG (a teacher, a stage-1 run, three stage-2 runs, three baselines and
    Table 2) through Snakemake's Slurm executor plugin and workflow/profiles/slurm: every
    training job is one sbatch job (ids from Snakemake's log, states from squeue), each ran on
    the GPU Slurm gave it (`refilled pin` kept Slurm's CUDA_VISIBLE_DEVICES), and the table is
    the one a local run makes with the same experiment profile.
 2. A training job cancelled with scancel mid-run resumes from its last finished epoch when the
    workflow is run again and ends on the weights of a run never interrupted; one requeued with
    `scontrol requeue` starts again as the same Slurm job, resumes, and Table 2 equals the local one.
 3. Snakemake killed while a training job runs, the job finishing afterwards: the next
    `snakemake --rerun-incomplete` does not train it again (locally and on Slurm).

The Slurm tests are marked `slurm`; they are skipped, with the reason, only where Slurm is not
installed and cannot be (no root or no apt-get). Where it is installed they run (CI installs
slurm-wlm and munge). Jobs run on the CPU; the node's GPUs are placeholders.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from snakemake_output import job_counts
from snakemake_workflow import copy_workflow, started_snakemake_in

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
ARCH = "wrn-10-1"
PROFILE = "slurmtest"
TEACHER = "results/runs/{profile}/teachers/table2/seed0"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
# the plugin's status checks: squeue (no accounting database here), first check after 1 s
SLURM_ARGS = ["--workflow-profile", "workflow/profiles/slurm", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1"]


def test_profile() -> dict:
    """The smoke profile cut to one ratio and one student of Table 2, CPU; a 3-epoch teacher on
    40 images per class (long enough to be interrupted between epochs)."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg.update(description="slurmtest: a Table-2 subset of smoke (tests/test_slurm.py)", device="cpu",
               gpus="auto", threads=1, train_per_class=40)
    t2 = cfg["experiments"]["table2"]
    t2.update(ratios=[0.6], students=[ARCH], per_class=8)
    t2["teacher"].update(arch=ARCH, per_class=40, epochs=3)
    cfg["figure1"].update(experiment="table2", ratio=0.6, arch=ARCH)
    cfg["figure3"].update(ratios=[0.6], arch=ARCH)
    return cfg


test_profile.__test__ = False     # a helper, not a test


def make_workflow(dst: Path, profiles=(PROFILE,)) -> Path:
    """A copy of the workflow with the test profiles, data/raw -> the real data."""
    copy_workflow(dst, {name: test_profile() for name in profiles})
    (dst / "tmp").mkdir()             # TMPDIR of the jobs: `refilled pin` keeps its slot locks there
    return dst


def env(wf: Path, cluster=None) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    path = [str(BIN), e.get("PATH", "")]
    if cluster is not None:
        path.insert(0, str(cluster.bin))
    e.update(PATH=os.pathsep.join(path), TMPDIR=str(wf / "tmp"))
    return e


def snakemake(wf: Path, *args, cluster=None, timeout: float = 900) -> str:
    """Run snakemake to the end; its output (stdout + stderr); fails the test on a non-zero exit."""
    proc = subprocess.run([str(BIN / "snakemake"), *map(str, args)], cwd=wf, env=env(wf, cluster),
                          capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake {' '.join(map(str, args))} failed ({proc.returncode}):\n{text[-6000:]}"
    return text


def started_snakemake(wf: Path, *args, cluster=None):
    return started_snakemake_in(wf, args, env(wf, cluster), wf / "snakemake-started.log")


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, wf: Path | None = None,
             timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        ended = proc is not None and proc.poll() is not None
        if ended or time.monotonic() > deadline:
            log = (wf / "snakemake-started.log").read_text()[-4000:] if wf else ""
            raise AssertionError(f"{'snakemake ended' if ended else 'timed out'} before {what}:\n{log}")
        time.sleep(0.01)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rows_of_checkpoint(path: Path) -> list[dict]:
    from refilled.io import load_tensors

    return [{k: str(v) for k, v in r.items()} for r in load_tensors(path)["rows"]]


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    from refilled.io import load_tensors

    sa, sb = load_tensors(a)["state_dict"], load_tensors(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs between {a} and {b}"


def files_of(run: Path) -> dict:
    """What identifies a run's outputs: the inode of each (a new training writes new files) and
    the bytes of summary.json and metrics.csv."""
    return {"inodes": {n: (run / n).stat().st_ino for n in ("summary.json", "model.pt", "metrics.csv")},
            "summary": (run / "summary.json").read_text(), "metrics": (run / "metrics.csv").read_text()}


# ------------------------------------------------------------------------------------------------
# the cluster
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm for this module (scripts/slurm_local.sh), stopped at the end."""
    inst = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    if inst.returncode != 0:
        pytest.skip(f"Slurm cannot be installed here: {(inst.stderr or inst.stdout).strip().splitlines()[-1]}")
    d = tmp_path_factory.mktemp("slurm")
    e = dict(os.environ, SLURM_LOCAL_CTLD_PORT=str(_free_port()), SLURM_LOCAL_D_PORT=str(_free_port()))
    start = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, env=e, timeout=120)
    try:
        assert start.returncode == 0, f"Slurm is installed but did not start:\n{start.stdout}\n{start.stderr}"
        yield SimpleNamespace(dir=d, bin=d / "bin")
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def local_run(cluster, tmp_path_factory) -> Path:
    """Table 2 of the test profile made locally: the reference of the Slurm runs."""
    local = make_workflow(tmp_path_factory.mktemp("local") / "wf")
    snakemake(local, "results/table2.csv", "--cores", 2, "--config", f"profile={PROFILE}")
    return local


def slurm(cluster, *args) -> str:
    """A Slurm client command of the test cluster; its stdout."""
    proc = subprocess.run([str(cluster.bin / args[0]), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}: {proc.stderr}"
    return proc.stdout


def job_states(cluster, ids) -> dict[str, str]:
    out = slurm(cluster, "squeue", "--states=all", "-h", "-o", "%i|%T", "-j", ",".join(ids))
    return dict(line.split("|") for line in out.split())


def submitted(text: str) -> list[str]:
    return SUBMITTED.findall(text)


# ------------------------------------------------------------------------------------------------
# 1. the DAG through sbatch
# ------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_dag_subset_runs_every_training_job_through_sbatch_and_makes_the_local_table(cluster, local_run, tmp_path):
    wf = make_workflow(tmp_path / "slurm")
    text = snakemake(wf, "results/table2.csv", *SLURM_ARGS, "--config", f"profile={PROFILE}", cluster=cluster)
    runs = sorted(p.parent for p in (wf / "results" / "runs").rglob("summary.json") if p.parent.name != ".finished")
    # a teacher (its run directory is seed0), stage 1, the three stage-2 variants, the three baselines
    assert len(runs) == 8 and {p.name for p in runs} == {
        "seed0", "stage1_kinf", "refilled_lam2", "refilled-minus_lam2", "refilled-emb_lam2", "student", "rkd",
        "aml"}, runs
    ids = submitted(text)
    assert len(ids) == len(set(ids)) == len(runs), f"one sbatch job per training job: {ids} for {len(runs)} runs"
    assert set(job_states(cluster, ids).values()) == {"COMPLETED"}
    # each ran inside its allocation on the GPU Slurm gave it (the node has two: 0 and 1)
    logs = sorted((wf / "results" / "logs" / PROFILE).rglob("*.log"))
    pinned = [re.findall(r"refilled pin: GPU (\S+)", p.read_text()) for p in logs]
    pinned = [g for g in pinned if g]
    assert len(pinned) == len(runs) and all(g[0] in ("0", "1") for g in pinned), pinned
    assert (wf / "results" / "table2.csv").is_file()
    assert (wf / "results" / "table2.csv").read_text() == (local_run / "results" / "table2.csv").read_text()


# ------------------------------------------------------------------------------------------------
# 2. scancel mid-run, then the workflow again
# ------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_job_resumes_from_its_last_epoch_to_the_uninterrupted_weights(cluster, local_run, tmp_path):
    wf = make_workflow(tmp_path / "wf")
    run = wf / TEACHER.format(profile=PROFILE)
    target = f"{TEACHER.format(profile=PROFILE)}/summary.json"
    args = [target, *SLURM_ARGS, "--config", f"profile={PROFILE}"]
    with started_snakemake(wf, *args, cluster=cluster) as proc:
        wait_for(lambda: (run / "resume.pt").exists(), "the teacher's first epoch", proc, wf)
        ids = submitted((wf / "snakemake-started.log").read_text())
        assert len(ids) == 1, ids
        slurm(cluster, "scancel", ids[0])
        rows_at_cancel = rows_of_checkpoint(run / "resume.pt")
        assert proc.wait(timeout=300) != 0, "Snakemake reports the cancelled job as failed"
    assert job_states(cluster, ids)[ids[0]] == "CANCELLED"
    assert not (run / "summary.json").exists()
    assert 1 <= len(rows_at_cancel) < 3

    text = snakemake(wf, *args, cluster=cluster)
    assert len(submitted(text)) == 1
    rows = read_rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:len(rows_at_cancel)] == rows_at_cancel, "resumed from the checkpoint (timings included), not restarted"

    ref = local_run / TEACHER.format(profile=PROFILE)       # the same teacher, never interrupted
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop(rows) == drop(read_rows(ref / "metrics.csv"))
    assert_same_weights(run / "model.pt", ref / "model.pt")


# ------------------------------------------------------------------------------------------------
# 2b. scontrol requeue mid-run (preemption with requeue): the same job starts again and resumes
# ------------------------------------------------------------------------------------------------


def restarts(cluster, job_id: str) -> int:
    """How many times Slurm started the job again (`scontrol show job`: Restarts=N)."""
    found = re.search(r"\bRestarts=(\d+)", slurm(cluster, "scontrol", "show", "job", "-o", job_id))
    assert found, f"scontrol show job {job_id} has no Restarts field"
    return int(found.group(1))


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_job_starts_again_resumes_from_its_last_epoch_and_makes_the_local_table(cluster, local_run, tmp_path):
    """`scontrol requeue` of the running teacher job, as a preemption with requeue does: Slurm
    ends it and, after its BeginTime (about two minutes), starts the same job id again; the
    run continues after its last finished epoch, the Snakemake that submitted it goes on
    without submitting it again, and Table 2 and the teacher's weights equal the local run's."""
    wf = make_workflow(tmp_path / "wf")
    run = wf / TEACHER.format(profile=PROFILE)
    args = ["results/table2.csv", *SLURM_ARGS, "--config", f"profile={PROFILE}"]
    with started_snakemake(wf, *args, cluster=cluster) as proc:
        # the plugin's --comment names the rule; other jobs of Table 2 may be queued beside it
        teacher_jobs = lambda: [line.split("|")[0] for line in slurm(cluster, "squeue", "-h", "-o", "%i|%k").split()
                                if line.split("|")[1].startswith("rule_teacher_")]
        wait_for(teacher_jobs, "the teacher's sbatch job", proc, wf)
        ids = teacher_jobs()
        assert len(ids) == 1, ids
        wait_for(lambda: (run / "resume.pt").exists(), "the teacher's first epoch", proc, wf)
        slurm(cluster, "scontrol", "requeue", ids[0])
        wait_for(lambda: restarts(cluster, ids[0]) == 1 and job_states(cluster, ids)[ids[0]] == "PENDING",
                 "Slurm requeued the job", proc, wf, timeout=60)
        assert not (run / "summary.json").exists(), "requeued before the teacher finished"
        rows_at_requeue = rows_of_checkpoint(run / "resume.pt")
        assert proc.wait(timeout=900) == 0, (wf / "snakemake-started.log").read_text()[-6000:]
    text = (wf / "snakemake-started.log").read_text()
    teacher_ids = [i for i in submitted(text) if i == ids[0]]
    assert len(teacher_ids) == 1, "Snakemake did not submit the requeued job again: Slurm restarted it"
    assert 1 <= len(rows_at_requeue) < 3
    rows = read_rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[:len(rows_at_requeue)] == rows_at_requeue, "resumed from the checkpoint (timings included), not restarted"

    ref = local_run / TEACHER.format(profile=PROFILE)
    assert_same_weights(run / "model.pt", ref / "model.pt")
    assert (wf / "results" / "table2.csv").read_text() == (local_run / "results" / "table2.csv").read_text()


# ------------------------------------------------------------------------------------------------
# 3. Snakemake died, the job finished afterwards: not trained again
# ------------------------------------------------------------------------------------------------


def _finished_after_snakemake_died(wf: Path, extra: list, cluster=None) -> None:
    run = wf / TEACHER.format(profile=PROFILE)
    target = f"{TEACHER.format(profile=PROFILE)}/summary.json"
    args = [target, *extra, "--config", f"profile={PROFILE}"]
    with started_snakemake(wf, *args, cluster=cluster) as proc:
        wait_for(lambda: (run / "resume.pt").exists(), "the teacher's first epoch", proc, wf)
        job = descendants(proc.pid)
        ids = submitted((wf / "snakemake-started.log").read_text())
        os.kill(proc.pid, signal.SIGKILL)               # Snakemake only; the training job goes on
        proc.wait()
        if cluster is None:
            assert job, "the local training job runs under snakemake"
            wait_for(lambda: not any(alive(p) for p in job), "the orphaned training job's end", timeout=300)
        else:
            assert len(ids) == 1, ids
            wait_for(lambda: job_states(cluster, ids)[ids[0]] in ("COMPLETED", "FAILED"), "the Slurm job's end",
                     timeout=300)
            assert job_states(cluster, ids)[ids[0]] == "COMPLETED"
    assert (run / "summary.json").exists() and not (run / "resume.pt").exists(), "the job finished on its own"
    before = files_of(run)

    snakemake(wf, target, "--unlock", "--config", f"profile={PROFILE}")
    text = snakemake(wf, *args, "--rerun-incomplete", cluster=cluster)
    if cluster is None:
        # Snakemake holds the job as incomplete and runs it again (deleting its outputs first) ...
        assert sum(job_counts(text).values()) == 1, text[-3000:]
    else:
        # on Slurm the job's own Snakemake (the plugin's jobstep, inside the allocation) cleared
        # the incomplete mark when the job ended, so the submitting Snakemake may see the run as
        # done; if it does run the job again, the job must restore it
        assert len(submitted(text)) == sum(job_counts(text).values()) <= 1, text[-3000:]
    # ... and the run is as it finished: the same files, not a second training
    assert files_of(run) == before, "the finished run was trained again"
    assert "Nothing to be done" in snakemake(wf, *args, "-n")


@pytest.mark.slow
def test_job_that_finished_after_snakemake_died_is_not_trained_again_locally(tmp_path):
    _finished_after_snakemake_died(make_workflow(tmp_path / "wf"), ["--cores", 1])


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_that_finished_after_snakemake_died_is_not_trained_again(cluster, tmp_path):
    _finished_after_snakemake_died(make_workflow(tmp_path / "wf"), SLURM_ARGS, cluster)


# ------------------------------------------------------------------------------------------------
# 4. `refilled pin` inside an allocation keeps the GPU Slurm gave
# ------------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_pin_inside_an_allocation_keeps_the_gpu_slurm_gave(cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # the first job holds GPU 0 while the second runs, so Slurm gives the second GPU 1
    hold = slurm(cluster, "sbatch", "--parsable", "--gpus=1", "-o", out / "hold.log", "--wrap", "sleep 30").strip()
    try:
        wait_for(lambda: job_states(cluster, [hold])[hold] == "RUNNING", "the first job's start", timeout=60)
        script = (f"echo SLURM $CUDA_VISIBLE_DEVICES; {BIN / 'refilled'} pin --gpus auto --per-gpu 2 --threads 0 "
                  f"--lock-dir {tmp_path / 'locks'} -- --version")
        job = slurm(cluster, "sbatch", "--parsable", "--gpus=1", "-o", out / "job.log",
                    "--export", f"ALL,PATH={BIN}:{os.environ['PATH']}", "--wrap", script).strip()
        wait_for(lambda: job_states(cluster, [job])[job] in ("COMPLETED", "FAILED"), "the probe job's end", timeout=120)
    finally:
        subprocess.run([str(cluster.bin / "scancel"), hold], capture_output=True)
    text = (out / "job.log").read_text()
    assert job_states(cluster, [job])[job] == "COMPLETED", text
    given = re.search(r"SLURM (\S+)", text).group(1)
    assert given == "1", text
    assert f"refilled pin: GPU {given}" in text, text


def test_pin_in_a_slurm_job_without_gpus_takes_none_of_the_nodes(monkeypatch):
    """Without GPUs from Slurm (no CUDA_VISIBLE_DEVICES in a job), `--gpus auto` must not count
    the node's GPUs with nvidia-smi: they are other jobs'. Outside Slurm it still does."""
    from refilled.tools import pin

    monkeypatch.setattr(pin, "_nvidia_smi_count", lambda: 4)
    assert pin.gpu_ids("auto", {"SLURM_JOB_ID": "7"}) == []
    assert pin.gpu_ids("auto", {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2"}) == ["2"]
    assert pin.gpu_ids("auto", {}) == ["0", "1", "2", "3"]


def test_profile_asks_for_one_task_whatever_the_gpu_count():
    """The profile's default resources, with gpu=2, give an sbatch call without --ntasks-per-gpu
    (the plugin's old default started such a job once per GPU) and with --gpus=2."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string",
                                 reason="pip install -e '.[cluster]' (the Slurm executor plugin)")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    defaults = dict(profile["default-resources"])

    class Resources(dict):
        __getattr__ = dict.__getitem__

    threads = 4
    resources = Resources({k: (threads if v == "threads" else v) for k, v in defaults.items()}, gpu=2)
    job = SimpleNamespace(resources=resources, threads=threads, is_group=lambda: False, name="train")
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "",
              "workdir": "/w"}
    call = submit.get_submit_command(job, params) + set_gres_string(job)
    assert "--ntasks-per-gpu" not in call and "--gpus=2" in call and "--cpus-per-gpu=4" in call, call
