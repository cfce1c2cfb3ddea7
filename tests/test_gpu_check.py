"""scripts/gpu_check.sh, the first thing a person with a GPU runs: its preparation (--prepare),
its plan against the budget (--plan), its refusal to start without the data, its training
stage and its CUDA-vs-CPU verdict, exercised on the CPU with tiny official-format
Fashion-MNIST (the stage's commands are the real CLI; the CUDA runs are stood in for by
planted summaries, since this machine has no GPU)."""

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
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


def plant_cuda(run_dir: Path, seed: int, test_acc: float, steps: dict | None = None, device: str = "cuda") -> None:
    d = run_dir / f"teacher_{device}_seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    summary = {"seed": seed, "test_acc": test_acc, "seconds": 1.0, **({"steps": steps} if steps else {})}
    (d / "summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_training_stage_and_verdict(tmp_path):
    make_fashion_idx(tmp_path / "data", n_train_per_class=10, n_test_per_class=4)
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    fmnist" in done.stdout
    run_dir = tmp_path / "out" / "fmnist" / "epochs1_per8"
    rows = list(csv.DictReader(open(run_dir / "accuracy.csv")))
    assert [(r["device"], r["seed"]) for r in rows] == [("cpu", "0"), ("cpu", "1")]
    cpu = [float(r["test_acc"]) for r in rows]
    for r in rows:
        summary = json.loads((run_dir / f"teacher_cpu_seed{r['seed']}" / "summary.json").read_text())
        assert summary["data"]["per_class"] == 8 and summary["epochs"] == 1 and summary["device"] == "cpu"
        assert summary["steps"]["mode"] == "eager" and summary["steps"]["captures"] == 0   # how the steps ran
        assert summary["steps"]["eager_steps"] > 0 and "steps" not in summary["fingerprint"]

    # CUDA results 30 points below the CPU's: the verdict must say so and the stage fail
    for seed, acc in enumerate(cpu):
        plant_cuda(run_dir, seed, acc - 0.3)
    far = run_check(tmp_path)
    assert far.returncode == 1 and "DIFFERENT" in far.stdout and "FAIL  fmnist" in far.stdout
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


def test_missing_data_refuses_to_start_with_one_line(tmp_path):
    done = run_check(tmp_path, STAGES="env tests fmnist")
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        f"gpu_check: Fashion-MNIST not found in {tmp_path / 'data'}/fashion-mnist (the four IDX files): run "
        f"scripts/gpu_check.sh --prepare on your machine and carry {tmp_path / 'data'}/fashion-mnist"]
    assert not (tmp_path / "out").exists(), "no stage may start"
    # three of the four files are not enough
    made = make_fashion_idx(tmp_path / "data", 2, 1)
    made["paths"]["t10k-labels-idx1-ubyte"].unlink()
    assert run_check(tmp_path, STAGES="fmnist").returncode == 2


def _steps(mode, captures, fallbacks):
    return {"mode": mode, "requested": "on", "captures": captures, "capture_failures": 0, "fallbacks": fallbacks,
            "graph_steps": 10, "eager_steps": fallbacks}


def test_verdict_says_how_the_steps_ran(tmp_path):
    """The verdict's labels come from the summaries' "steps" records, not a fixed "graph"."""
    make_fashion_idx(tmp_path / "data", 2, 1)
    run_dir = tmp_path / "out" / "fmnist" / "epochs1_per8"
    for seed in (0, 1):
        plant_cuda(run_dir, seed, 0.80, {**_steps("eager", 0, 0), "requested": "off"}, device="cpu")
        plant_cuda(run_dir, seed, 0.80, _steps("graph", 1, 0))
    done = run_check(tmp_path, DEVICES=" ")     # no training: only the verdict over the planted runs
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUDA (steps: graph; 2 captures, 0 fallbacks; bf16)" in done.stdout
    assert "CPU (steps: eager; 0 captures, 0 fallbacks; fp32)" in done.stdout and "NOTE" not in done.stdout
    rows = list(csv.DictReader(open(run_dir / "accuracy.csv")))
    assert [(r["device"], r["steps"], r["captures"]) for r in rows] == [("cuda", "graph", "1")] * 2 + [
        ("cpu", "eager", "0")] * 2

    plant_cuda(run_dir, 0, 0.80, {**_steps("eager", 0, 12), "capture_failures": 1,
                                  "capture_disabled": "CUDA graph capture failed (RuntimeError: boom)"})
    plant_cuda(run_dir, 1, 0.80, _steps("graph with fallbacks", 1, 3))
    done = run_check(tmp_path, DEVICES=" ")
    assert "CUDA (steps: eager/graph with fallbacks; 1 captures, 15 fallbacks; bf16)" in done.stdout
    assert ("NOTE: 2 of 2 CUDA runs did not replay every step from a graph: CUDA graph capture failed "
            "(RuntimeError: boom); graph with fallbacks") in done.stdout
    plant_cuda(run_dir, 0, 0.80)                 # a summary from before the record existed
    assert "CUDA (steps: graph with fallbacks/not recorded; bf16)" in run_check(tmp_path, DEVICES=" ").stdout


def _plan(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), "--plan", *args], env={**os.environ, "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=300)


def _timed_minimum(bench_args: str) -> float:
    """The least timed seconds of a bench call, from the configuration: every row times our
    step, the reference and (CUDA graph rows, unless --eager no) our eager step for --seconds
    each, and the teacher's forward for half that; each concurrency round times its jobs for
    3 s (the full configuration's default)."""
    from refilled.tools.bench_cases import full_config, is_target, method_has_teacher

    words = bench_args.split()
    seconds = float(words[words.index("--seconds") + 1])
    part = words[words.index("--part") + 1]
    eager = not ("--eager" in words and words[words.index("--eager") + 1] == "no")
    rounds = 0
    if "--concurrent" in words:
        rest = words[words.index("--concurrent") + 1:]
        rounds = len(list(__import__("itertools").takewhile(str.isdigit, rest)))
    cases = [c for c in full_config().cases if is_target(c) == (part == "targets")]
    per_row = lambda c: seconds * (2 + eager) + (seconds / 2 if method_has_teacher(c) else 0)
    return sum(per_row(c) for c in cases) + 3.0 * rounds


def test_plan_fits_the_budget():
    done = _plan()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    table = re.findall(r"^  (\S+)\s+(\d+)s\s+(\d+s|rest)\s+(\d+)s$", out, re.M)
    assert [t[0] for t in table] == ["env", "tests", "bench-targets", "fmnist", "bench-rest"]   # order of value
    estimates = {name: int(e) for name, e, _, _ in table}
    limits = {name: int(limit[:-1]) for name, _, limit, _ in table if limit != "rest"}
    assert sum(estimates.values()) <= 480 and sum(limits.values()) <= 480
    assert [int(t[3]) for t in table][-1] == 480
    for name in ("bench-targets", "bench-rest"):
        args = re.search(rf"^  {name}:\s+refilled.tools.bench (.*)$", out, re.M).group(1)
        timed = _timed_minimum(args)
        assert estimates[name] >= timed, (name, estimates[name], timed)
        assert limits.get(name, 480 - sum(limits.values())) >= timed, name
    # the value stages: the README's target rows with eager timing at 1 s, and one concurrency round
    targets = re.search(r"^  bench-targets:\s+refilled.tools.bench (.*)$", out, re.M).group(1)
    assert "--part targets" in targets and "--seconds 1" in targets and re.search(r"--concurrent \d+$", targets)
    assert "fits the budget" in out


def test_plan_that_does_not_fit_says_so():
    done = _plan("--budget", "300")
    assert done.returncode == 1 and "DOES NOT FIT the budget" in done.stdout
    assert _plan("--budget", "soon").returncode == 2


def test_prepare_puts_the_data_checks_it_and_prints_the_carry():
    """--prepare into an empty DATA_ROOT inside the working tree: the four files arrive
    (from the Debian package where installed, as `refilled data fetch` takes them), pass
    `refilled data check`, and the carry line names the folder relative to the tree."""
    debian = Path("/usr/share/datasets/fashion-mnist")
    (ROOT / "runs").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="test-prepare-", dir=ROOT / "runs"))    # runs/ is git-ignored
    try:
        if not debian.is_dir():   # no package here: the repository's copy stands in for it
            local = ROOT / "data" / "raw" / "fashion-mnist"
            if not local.is_dir():
                pytest.skip("neither the Debian package nor data/raw/fashion-mnist is on this machine")
            shutil.copytree(local, root / "fashion-mnist")
        rel = root.relative_to(ROOT)
        done = subprocess.run(["bash", str(SCRIPT), "--prepare"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHON": sys.executable, "DATA_ROOT": str(rel)})
        assert done.returncode == 0, done.stdout + done.stderr
        names = sorted(p.name.removesuffix(".gz") for p in (root / "fashion-mnist").iterdir())
        assert names == sorted(["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                                "t10k-labels-idx1-ubyte"])
        assert "checksums: verified" in done.stdout and "train 60000 images" in done.stdout
        assert f'carry: ["{rel}/fashion-mnist"]' in done.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_prepare_refuses_a_data_root_outside_the_tree(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--prepare"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, "DATA_ROOT": str(tmp_path)})
    assert done.returncode == 2 and "outside the working tree" in done.stdout
    assert not (tmp_path / "fashion-mnist").exists()


def test_environment_stage_prints_the_tf32_settings_and_variables(tmp_path):
    """Where an image forces TF32 (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), the log must say so.
    On this CPU machine the stage then fails (no CUDA device), after printing them."""
    done = run_check(tmp_path, STAGES="env", TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="1", NVIDIA_TF32_OVERRIDE="0")
    unset = run_check(tmp_path, STAGES="env", TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="", NVIDIA_TF32_OVERRIDE="")
    line = r"TF32: torch.backends.cuda.matmul.allow_tf32=(True|False), torch.backends.cudnn.allow_tf32=(True|False), " \
           r"float32_matmul_precision=(\w+)"
    forced, plain = re.search(line, done.stdout), re.search(line, unset.stdout)
    assert forced and plain, done.stdout
    assert forced.group(1) != plain.group(1), "the override must show in what torch reports"   # torch reads it
    assert "  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in done.stdout and "  NVIDIA_TF32_OVERRIDE=0" in done.stdout
    assert "  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=(unset)" in unset.stdout
    assert done.returncode == 1 and "no CUDA device visible" in done.stdout + done.stderr
