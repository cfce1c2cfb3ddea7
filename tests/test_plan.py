"""`refilled plan`: the runs a profile's targets need (refilled.experiments.grid), their SGD steps, images,
FLOPs (refilled.tools.flops, the committed flops.csv) and model.pt bytes, checked against independent
computations: steps by hand from the profile's numbers and by iterating the real training
loader, FLOPs of a tiny network by hand, the committed table by recounting, checkpoint sizes by
saving a model, and the run count against Snakemake's own dry run."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import cli
from snakemake_output import job_counts

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def plan_rows(profile: str, targets=()) -> dict:
    from refilled.tools.plan import build_plan

    return build_plan(ROOT, profile, list(targets), [], 2, 4.0)


def one_run(plan: dict, path_part: str) -> dict:
    rows = [r for r in plan["rows"] if path_part in r["run"].path]
    assert len(rows) == 1, [r["run"].path for r in rows]
    return rows[0]


# ---- steps and images, by hand from config/demo.yaml and config/smoke.yaml ----

def test_demo_teacher_steps_by_hand():
    # demo table2 teacher: 300 images per class of its 5 classes, batch 32, 6 epochs;
    # the last partial batch is dropped: 1500 // 32 = 46 steps an epoch of 32 images
    row = one_run(plan_rows("demo", ["teachers"]), "teachers/table2/seed0")
    assert row["arch"] == "wrn-16-2"
    assert (row["steps"], row["images"]) == (6 * 46, 6 * 46 * 32)


def test_smoke_student_with_validation_split_by_hand():
    # smoke table2: pool 16 per class, 4 held out for validation, 8 per class drawn from the
    # other 12, h = 5: 40 images, batch 8: 5 steps; stage 2 runs 1 epoch; evaluation every
    # epoch (validation) over 5 x 10 test + 5 x 4 validation images, then the final NCM pass
    # over the 40 training and 50 test images
    from refilled.tools.flops import Costs, load_table

    plan = plan_rows("smoke", ["results/table2.csv"])
    row = one_run(plan, "students/table2/r0.6/wrn-10-1/seed0/refilled_lam2")
    assert (row["steps"], row["images"]) == (5, 40)
    c = Costs(load_table(), "wrn-10-1", 32, 5)
    t = Costs(load_table(), "wrn-10-1", 32, 5)   # smoke's table2 teacher is a WRN-(10,1) too
    assert row["train_flops"] == 40 * (c.train + t.fwd)
    assert row["eval_flops"] == (50 + 20 + 40 + 50) * c.fwd


def test_fewer_images_than_a_batch_is_one_step():
    from refilled.tools.flops import load_table
    from refilled.experiments.profile import load_profile
    from refilled.experiments.grid import student_run
    from refilled.tools.plan import run_plan

    cfg = copy.deepcopy(load_profile(ROOT, "smoke"))
    cfg["experiments"]["table1"]["per_class"] = 2          # 4 classes x 2 = 8 images < batch 16
    row = run_plan(cfg, student_run(cfg, "table1", 0, "mobilenet-0.25", 0, "student"), load_table())
    assert (row["steps"], row["images"]) == (1, 8)


def test_validation_images_come_out_of_the_pool():
    # smoke table2 with every image of the pool: 16 per class, 4 of them held out for
    # validation, so 5 x 12 = 60 training images, batch 8: 7 steps of 8 images
    from refilled.tools.flops import load_table
    from refilled.experiments.profile import load_profile
    from refilled.experiments.grid import student_run
    from refilled.tools.plan import run_plan

    cfg = copy.deepcopy(load_profile(ROOT, "smoke"))
    cfg["experiments"]["table2"]["per_class"] = None
    row = run_plan(cfg, student_run(cfg, "table2", 1, "wrn-10-1", 0, "student"), load_table())
    assert (row["steps"], row["images"]) == (7, 56)


@pytest.mark.parametrize("n,batch", [(40, 8), (41, 8), (47, 16), (8, 16), (16, 16), (1, 4)])
def test_steps_per_epoch_is_what_the_training_loader_yields(n, batch):
    import torch

    from refilled.data.batches import Batches, TaskSplit
    from refilled.data.datasets import ArraySplit, Dataset
    from refilled.tools.plan import steps_per_epoch

    source = ArraySplit(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % 2)
    split = TaskSplit(source, torch.arange(n), source.labels, [0, 1])
    ds = Dataset("t", ["a", "b"], source, source, (0.5,) * 3, (0.5,) * 3)
    batches = list(Batches(split, ds, batch, True, torch.device("cpu")))
    assert steps_per_epoch(n, batch) == len(batches)


# ---- FLOPs ----

def test_flop_counter_on_a_tiny_net_by_hand():
    """conv 3->4 (3x3, pad 1) on 8x8, depthwise 3x3 conv over 4 channels, pool, linear 4->2;
    2 FLOPs per multiply-add. Backward: every layer's weight gradient costs its forward, every
    input gradient too except the first layer's (the image needs none)."""
    import torch
    from torch import nn

    from refilled.tools.flops import flop_counter

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    b = 2
    conv1 = 2 * b * 8 * 8 * 4 * 3 * 3 * 3
    depthwise = 2 * b * 8 * 8 * 4 * 3 * 3 * 1
    linear = 2 * b * 4 * 2
    x = torch.randn(b, 3, 8, 8)
    fwd = flop_counter()
    with fwd:
        net(x)
    assert fwd.get_total_flops() == conv1 + depthwise + linear
    train = flop_counter()
    with train:
        net(x).sum().backward()
    assert train.get_total_flops() == (conv1 + depthwise + linear) + conv1 + 2 * depthwise + 2 * linear


SMALL = [("wrn-10-1", 32), ("wrn-16-1", 32), ("mobilenet-0.25", 32), ("mobilenet-0.25", 64)]


@pytest.mark.parametrize("arch,px", SMALL, ids=lambda x: str(x))
def test_committed_flops_table_matches_a_recount(arch, px):
    from refilled.tools.flops import load_table, row

    assert load_table()[(arch, px)] == row(arch, px)


def test_wrn_forward_flops_by_hand():
    """WRN-(10,1) at 32 px, every convolution and the head written out (pre-activation, 1x1
    shortcut where the shape changes): an independent check of the committed numbers."""
    from refilled.tools.flops import Costs, load_table

    def conv(cin, cout, k, side):
        return 2 * side * side * cout * cin * k * k

    groups = [(16, 16, 32), (16, 32, 16), (32, 64, 8)]   # (in, out, output side) of the one block per group
    flops = conv(3, 16, 3, 32)
    for cin, cout, side in groups:
        flops += conv(cin, cout, 3, side) + conv(cout, cout, 3, side) + (conv(cin, cout, 1, side) if cin != cout else 0)
    classes = 7
    assert Costs(load_table(), "wrn-10-1", 32, classes).fwd == flops + 2 * 64 * classes


def test_every_profile_architecture_is_in_the_table():
    from refilled.experiments.profile import load_profile
    from refilled.tools.flops import load_table
    from refilled.tools.plan import DATASETS

    table = load_table()
    for path in sorted((ROOT / "config").glob("*.yaml")):
        cfg = load_profile(ROOT, path.stem)
        for exp in cfg["experiments"].values():
            px = DATASETS[exp["dataset"]].px
            for arch in [exp["teacher"]["arch"], *exp["students"]]:
                assert (arch, px) in table, f"{path.name}: {arch} at {px} px"


def test_checkpoint_bytes_match_a_saved_model(tmp_path):
    from refilled.training.checkpoints import save_model
    from refilled.tools.flops import Costs, load_table
    from refilled.models import build_model

    for arch, classes in (("wrn-10-1", 5), ("mobilenet-0.25", 50)):
        save_model(tmp_path / "m.pt", build_model(arch, classes), arch, list(range(classes)))
        size = (tmp_path / "m.pt").stat().st_size
        # the zip records align each tensor to 64 bytes: the estimate is within a few records
        assert abs(Costs(load_table(), arch, 32, classes).checkpoint_bytes - size) <= 256, (arch, size)


def test_dataset_sizes_are_the_official_ones():
    from refilled.data.check import OFFICIAL_COUNTS
    from refilled.tools.plan import DATASETS

    for name, d in DATASETS.items():
        c = OFFICIAL_COUNTS[name]
        assert (d.classes, d.train_per_class * d.classes, d.test_per_class * d.classes) == \
            (c["n_classes"], c["n_train"], c["n_test"])


# ---- the schedule ----

def test_wall_time_waits_for_inputs_and_fills_slots():
    """A teacher (10 s); stage 1 reads it (5 s), stage 2 reads stage 1 (5 s); a plain student of
    another table reads nothing (3 s)."""
    from refilled.experiments.profile import load_profile
    from refilled.experiments.grid import closure, student_run
    from refilled.tools.plan import wall_seconds

    cfg = load_profile(ROOT, "smoke")
    runs = closure(cfg, [student_run(cfg, "table1", 0, "mobilenet-0.25", 0, "refilled"),
                         student_run(cfg, "table2", 0.6, "wrn-10-1", 0, "student")])
    kinds = [(r.kind, r.method) for r in runs]
    assert kinds == [("teacher", "student"), ("student", "stage1"), ("student", "refilled"), ("student", "student")]
    rows = [{"run": r} for r in runs]
    seconds = [10, 5, 5, 3]
    # one slot: everything in a row; two: the table2 student (needs no teacher) runs beside the teacher
    assert wall_seconds(rows, seconds, 1, cfg) == 23
    assert wall_seconds(rows, seconds, 2, cfg) == 20


# ---- the command ----

PROBE = """
import json, sys
from refilled.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}))
"""


def test_plan_imports_no_torch_and_writes_csv(tmp_path):
    out = tmp_path / "plan.csv"
    proc = subprocess.run([sys.executable, "-c", PROBE, "plan", "--root", ROOT, "--profile", "paper", "all",
                           "--out", out], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "torch": False}, proc.stderr[-2000:]
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["method", "arch", "px", "runs", "steps", "images", "train_flops", "eval_flops",
                                 "fwd_flops_per_image", "train_flops_per_image", "checkpoint_bytes", "cpu_seconds",
                                 "gpu_seconds"]
    body, last = rows[:-1], rows[-1]
    assert last["method"] == "TOTAL"
    for key in ("runs", "steps", "images", "train_flops", "checkpoint_bytes"):
        assert int(last[key]) == sum(int(r[key]) for r in body), key
    # paper: 9 teachers, 1467 student runs, 132 Table H references (Snakemake's dry run, 4 Dec 2026)
    assert int(last["runs"]) == 9 + 1467 + 132
    assert all(r["gpu_seconds"] == "" for r in rows)      # no GPU measured: no number
    assert "no GPU has been measured" in proc.stdout


def test_plan_gpu_time_from_a_bench_file(tmp_path):
    """A GPU bench row: time = FLOPs / (img/s x the step's FLOPs per image)."""
    from refilled.tools.flops import Costs, load_table
    from refilled.tools.plan import BENCH_CLASSES

    bench = tmp_path / "bench.csv"
    bench.write_text("method,student,teacher,px,jobs,ours_img_s,device\n"
                     "student,wrn-10-1,,32,1,1000,NVIDIA H100\n"
                     "student,wrn-10-1,,32,4,9999,NVIDIA H100\n")   # a concurrent row: not a single job's rate
    out = tmp_path / "plan.csv"
    # a target after --bench stays a target
    rc, stdout, err = cli(["plan", "--root", ROOT, "--profile", "smoke", "--bench", bench, "teachers", "--out", out])
    assert rc == 0, err
    rate = 1000 * Costs(load_table(), "wrn-10-1", 32, BENCH_CLASSES).train
    rows = {r["arch"]: r for r in csv.DictReader(open(out, newline=""))}
    teacher = rows["wrn-10-1"]
    expected = (int(teacher["train_flops"]) + int(teacher["eval_flops"])) / rate
    assert math.isclose(float(teacher["gpu_seconds"]), expected, abs_tol=0.06)
    assert "NVIDIA H100" in stdout


def test_cpu_rate_follows_the_jobs_threads(tmp_path):
    """A bench row measured with 2 threads; smoke's jobs run on 1 core each: half the rate."""
    from refilled.tools.flops import Costs, load_table
    from refilled.tools.plan import BENCH_CLASSES

    bench = tmp_path / "bench.csv"
    bench.write_text("method,student,teacher,px,jobs,ours_img_s,device\nstudent,wrn-10-1,,32,1,500,cpu (2 threads)\n")
    out = tmp_path / "plan.csv"
    rc, _, err = cli(["plan", "--root", ROOT, "--profile", "smoke", "teachers", "--bench", bench, "--overhead-s", "3",
                      "--out", out])
    assert rc == 0, err
    rate = 500 * Costs(load_table(), "wrn-10-1", 32, BENCH_CLASSES).train / 2
    teacher = {r["arch"]: r for r in csv.DictReader(open(out, newline=""))}["wrn-10-1"]
    expected = 3 + (int(teacher["train_flops"]) + int(teacher["eval_flops"])) / rate
    assert math.isclose(float(teacher["cpu_seconds"]), expected, abs_tol=0.06)


@pytest.mark.parametrize("argv,needle", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--profile", "smoke", "results/table9.csv"], "unknown target 'results/table9.csv'"),
    (["--profile", "smoke", "--bench", "missing.csv"], "missing.csv"),
    (["--profile", "smoke", "--cores", "0"], "--cores"),
    (["--profile", "smoke", "--root", "/nonexistent"], "--root /nonexistent"),
])
def test_bad_input_exits_2_naming_it_and_writes_nothing(tmp_path, argv, needle):
    out = tmp_path / "plan.csv"
    rc, _, err = cli(["plan", "--root", ROOT, *argv, "--out", out])   # a later --root wins
    assert rc == 2 and needle in err, err
    assert not out.exists()


def test_bad_bench_file_names_file_and_line(tmp_path):
    bench = tmp_path / "b.csv"
    bench.write_text("method,student,teacher,px,jobs,ours_img_s,device\nstudent,wrn-10-1,,32,1,fast,cpu\n")
    rc, _, err = cli(["plan", "--root", ROOT, "--profile", "smoke", "--bench", bench])
    assert rc == 2 and f"{bench}, line 2" in err, err


# ---- the run count equals Snakemake's ----

@pytest.mark.slow
@pytest.mark.parametrize("profile", ["smoke", "demo"])
def test_training_runs_equal_the_dry_runs_training_jobs(tmp_path, profile):
    """The plan's runs are the dry run's jobs of rules teacher, train and joint_reference, run
    directory for run directory (the spelling common.smk's paths use)."""
    import re

    proc = subprocess.run([BIN / "snakemake", "all", "-n", "--cores", "2", "-s", ROOT / "Snakefile", "-d", tmp_path,
                           "--config", f"profile={profile}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    jobs = job_counts(out)
    dirs = set(re.findall(rf"^\s+output: results/runs/{profile}/(\S+?)/summary\.json", out, flags=re.M))
    plan = plan_rows(profile)
    kinds = {k: sum(r["run"].kind == k for r in plan["rows"]) for k in ("teacher", "student", "reference")}
    assert (kinds["teacher"], kinds["student"], kinds["reference"]) == \
        (jobs["teacher"], jobs["train"], jobs.get("joint_reference", 0))
    assert {r["run"].path for r in plan["rows"]} == dirs
