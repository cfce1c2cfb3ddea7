"""End-to-end tests of the `refilled` command line on tiny fake Fashion-MNIST (CPU, wrn-10-1).

The whole chain (split -> teacher -> stage 1 -> stage 2 -> baselines) is built once per
module by the `chain` fixture and inspected by the tests that follow. Commands run
in-process through `refilled.cli.main`, and through the installed `refilled` script where
the entry point itself is under test (help, split, the killed-and-resumed run).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import cli, failed, ok
from cpu_pin import one_cpu  # noqa: F401 (autouse: this module runs on one CPU)
import torch
import torch.nn.functional as F

from fakedata import FASHION_FILES, idx_bytes, make_fashion_idx, write_maybe_gz
from refilled.training.checkpoints import load_model
from refilled.cli import build_parser, main
from refilled.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_dataset
from refilled.io import load_tensors

pytestmark = pytest.mark.slow

REFILLED = Path(sys.executable).parent / "refilled"
ARCH = "wrn-10-1"
EPOCHS = 2
N_TRAIN, N_TEST = 16, 4          # per class; the student task has 2 classes -> 32 training images
SUBCOMMANDS = ["data", "split", "train-teacher", "train-stage1", "train-stage2", "train-baseline", "ncm"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_learnable_fashion(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Official-format Fashion-MNIST (via fakedata) whose pixel brightness depends on the label,
    so a teacher's embeddings separate the classes and p_T(y|x) is far from uniform."""
    fake = make_fashion_idx(root, n_train, n_test, gz=False, seed=seed)
    for prefix in ("train", "t10k"):
        images = fake[f"{prefix}_images"] // 5 + 20 * fake[f"{prefix}_labels"][:, None, None]
        fake[f"{prefix}_images"] = images.astype(np.uint8)
        write_maybe_gz(fake["dir"] / f"{prefix}-images-idx3-ubyte", idx_bytes(fake[f"{prefix}_images"]), False)
    return fake


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def normalised(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(FASHION_MNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FASHION_MNIST_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def task_images(split, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dataset indices, images, task labels) of every image of `classes`."""
    idx = torch.cat([torch.nonzero(split.labels == c).flatten() for c in classes])
    to_task = {c: k for k, c in enumerate(classes)}
    return idx, split.images[idx], torch.tensor([to_task[int(split.labels[i])] for i in idx])


@torch.no_grad()
def forward(model, images_uint8: torch.Tensor):
    model.eval()
    return model(normalised(images_uint8))


# ------------------------------------------------------------------------------------------------
# the chain, built once
# ------------------------------------------------------------------------------------------------


class Chain:
    def __init__(self, base: Path):
        self.base = base
        self.root = base / "data"
        self.fake = make_learnable_fashion(self.root, N_TRAIN, N_TEST)
        self.split_path = base / "split.json"
        self.results: dict[str, tuple[int, str, str]] = {}
        self.dirs: dict[str, Path] = {}

    def common(self, epochs: int = EPOCHS, split: Path | None = None, arch: str = ARCH) -> list:
        return ["--split", split or self.split_path, "--arch", arch, "--data-root", self.root, "--no-checksum",
                "--epochs", epochs, "--batch-size", 8, "--device", "cpu"]

    def run(self, name: str, command: str, *extra, **common_kw) -> Path:
        out = self.base / "runs" / name
        self.results[name] = cli([command, *self.common(**common_kw), *extra, "--out", out])
        self.dirs[name] = out
        return out

    @property
    def split(self) -> dict:
        return json.loads(self.split_path.read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    c = Chain(tmp_path_factory.mktemp("chain"))
    ok(cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 0, "--classes-per-task", 2,
            "--out", c.split_path]))
    teacher = c.run("teacher", "train-teacher") / "model.pt"
    s1 = c.run("stage1-inf", "train-stage1", "--teacher", teacher, "--k-hat", "inf") / "model.pt"
    c.run("stage1-k1", "train-stage1", "--teacher", teacher, "--k-hat", "1")
    for variant in ("refilled", "refilled-minus", "refilled-emb"):
        c.run(f"stage2-{variant}", "train-stage2", "--teacher", teacher, "--init", s1, "--variant", variant)
    c.run("stage2-batch", "train-stage2", "--teacher", teacher, "--init", s1, "--variant", "refilled",
          "--centers", "batch")
    c.run("stage2-lr0", "train-stage2", "--teacher", teacher, "--init", s1, "--variant", "refilled", "--lr", 0,
          epochs=1)
    c.run("baseline-student", "train-baseline", "--method", "student")
    for method in ("rkd", "aml"):
        c.run(f"baseline-{method}", "train-baseline", "--method", method, "--teacher", teacher)
    return c


# ------------------------------------------------------------------------------------------------
# 1. help
# ------------------------------------------------------------------------------------------------


def _commands(parser=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command path of the parser, nested ones included: (), ("data",), ("data", "check"), ..."""
    parser = parser or build_parser()
    found = [prefix]
    for action in parser._actions:
        if action.choices and hasattr(action, "_name_parser_map"):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


# What the help of the commands these tests use must mention (any other command: just its usage line).
HELP_MENTIONS = {
    (): ["usage: refilled", "--version", *SUBCOMMANDS],
    ("data",): ["usage: refilled data", "fetch", "check"],
    ("data", "fetch"): ["usage: refilled data fetch", "--root", "--dataset"],
    ("data", "check"): ["usage: refilled data check", "--root", "--no-checksum", "--decode-limit"],
    ("split",): ["usage: refilled split", "--ratio", "--seed", "--classes-per-task", "--out"],
    ("train-teacher",): ["usage: refilled train-teacher", "--split", "--arch", "--epochs", "--out", "--no-checksum"],
    ("train-stage1",): ["usage: refilled train-stage1", "--teacher", "--k-hat", "--tau", "--margin", "--scale"],
    ("train-stage2",): ["usage: refilled train-stage2", "--teacher", "--init", "--variant", "--lam", "--centers",
                        "refilled-minus", "refilled-emb"],
    ("train-baseline",): ["usage: refilled train-baseline", "--method", "rkd", "aml"],
    ("ncm",): ["usage: refilled ncm", "--model", "--random-init", "--task"],
}


def test_the_commands_under_test_exist():
    commands = _commands()
    assert set(HELP_MENTIONS) <= set(commands), set(HELP_MENTIONS) - set(commands)
    assert len(commands) == len(set(commands))


@pytest.mark.parametrize("argv", _commands(), ids=lambda c: " ".join(c) or "refilled")
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: refilled {' '.join(argv)}".strip()), captured.out
    for text in HELP_MENTIONS.get(tuple(argv), []):
        assert text in captured.out, f"{text!r} missing from `refilled {' '.join(argv)} --help`:\n{captured.out}"


def test_version(capsys):
    from refilled import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"refilled {__version__}"


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: refilled" in capsys.readouterr().err


def test_entry_point_help_via_subprocess():
    assert REFILLED.is_file(), f"console script not installed at {REFILLED}"
    for argv in ([], ["data", "check"]):
        proc = subprocess.run([REFILLED, *argv, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"usage: refilled {' '.join(argv)}".strip() in proc.stdout


# ------------------------------------------------------------------------------------------------
# 2. split
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,h", [(0.6, 5), (0.0, 5), (1.0, 5), (0.5, 2), (0.25, 4)])
def test_split_writes_the_rule(tmp_path, capsys, ratio, h):
    out = tmp_path / "sub" / "split.json"
    assert main(["split", "--dataset", "fashion-mnist", "--ratio", str(ratio), "--seed", "3",
                 "--classes-per-task", str(h), "--out", str(out)]) == 0
    split = json.loads(out.read_text())
    assert set(split) == {"teacher_classes", "student_classes", "dataset", "ratio", "seed", "classes_per_task",
                          "class_order"}
    assert split["dataset"] == "fashion-mnist" and split["ratio"] == ratio and split["seed"] == 3
    assert split["classes_per_task"] == h
    t, s = split["teacher_classes"], split["student_classes"]
    assert len(t) == len(set(t)) == h and len(s) == len(set(s)) == h
    assert set(t) | set(s) <= set(range(10))
    assert len(set(t) & set(s)) == round(ratio * h)
    stdout = capsys.readouterr().out
    assert str(t) in stdout and str(s) in stdout


def test_split_default_h_is_half_the_classes(tmp_path):
    out = tmp_path / "split.json"
    ok(cli(["split", "--dataset", "fashion-mnist", "--ratio", "0.4", "--seed", "0", "--out", out]))
    split = json.loads(out.read_text())
    assert split["classes_per_task"] == 5 and len(set(split["teacher_classes"]) & set(split["student_classes"])) == 2


def test_split_bad_ratio(tmp_path, capsys):
    out = tmp_path / "split.json"
    rc = main(["split", "--dataset", "fashion-mnist", "--ratio", "0.3", "--seed", "0", "--classes-per-task", "5",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc != 0
    assert "0.3" in captured.err
    assert "0, 0.2, 0.4, 0.6, 0.8, 1" in captured.err, captured.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_split_via_entry_point(tmp_path):
    out = tmp_path / "split.json"
    proc = subprocess.run([REFILLED, "split", "--dataset", "fashion-mnist", "--ratio", "0.5", "--seed", "1",
                           "--classes-per-task", "2", "--out", out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    split = json.loads(out.read_text())
    from refilled.data.splits import make_split

    assert split == make_split("fashion-mnist", 0.5, 1, 2)
    bad = subprocess.run([REFILLED, "split", "--dataset", "fashion-mnist", "--ratio", "0.3", "--seed", "1",
                          "--classes-per-task", "5", "--out", tmp_path / "bad.json"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "valid ratios" in bad.stderr and not (tmp_path / "bad.json").exists()


# ------------------------------------------------------------------------------------------------
# 3. data check
# ------------------------------------------------------------------------------------------------


def test_data_check_ok_without_checksums(tmp_path, capsys):
    make_fashion_idx(tmp_path, n_train_per_class=3, n_test_per_class=2)
    before = snapshot(tmp_path)
    assert main(["data", "check", "--dataset", "fashion-mnist", "--root", str(tmp_path), "--no-checksum"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist: OK" in out
    assert "train 30 images, 3..3 per class" in out
    assert "test  20 images, 2..2 per class" in out
    assert "classes 10" in out and "checksums: skipped" in out
    assert "images decoded: 50 of 50" in out
    assert "counts differ from the official release" in out
    assert snapshot(tmp_path) == before


def _check(root) -> tuple[int, str, str]:
    return cli(["data", "check", "--dataset", "fashion-mnist", "--root", root])


def test_data_check_checksums_fail_on_fake_files(tmp_path):
    fake = make_fashion_idx(tmp_path, 3, 2)
    before = snapshot(tmp_path)
    err = failed(_check(tmp_path))
    assert "SHA-256" in err
    assert any(str(p) in err for p in fake["paths"].values()), err
    assert snapshot(tmp_path) == before


def test_data_check_truncated_file(tmp_path):
    fake = make_fashion_idx(tmp_path, 3, 2)
    victim = fake["paths"]["t10k-labels-idx1-ubyte"]
    victim.write_bytes(victim.read_bytes()[:-3])
    before = snapshot(tmp_path)
    err = failed(cli(["data", "check", "--dataset", "fashion-mnist", "--root", tmp_path, "--no-checksum"]))
    assert str(victim) in err and "truncated" in err
    assert snapshot(tmp_path) == before


def test_data_check_missing_file(tmp_path):
    fake = make_fashion_idx(tmp_path, 3, 2)
    fake["paths"]["train-images-idx3-ubyte"].unlink()
    before = snapshot(tmp_path)
    err = failed(cli(["data", "check", "--dataset", "fashion-mnist", "--root", tmp_path, "--no-checksum"]))
    assert "train-images-idx3-ubyte" in err and "missing" in err
    for other in FASHION_FILES[1:]:
        assert other not in err.split("\n")[0], "only the missing file is named"
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# 4. the chain
# ------------------------------------------------------------------------------------------------

MULTISTEP_2 = [0.1, 0.02]     # x0.2 at 50% of 2 epochs
COSINE_2 = [0.1, 0.055]       # 0.01 + 0.09 * (1 + cos(pi / 2)) / 2

# name: (method, loss columns, metric, lr per epoch, task)
RUNS = {
    "teacher": ("student", ["ce"], "test_acc", MULTISTEP_2, "teacher"),
    "stage1-inf": ("stage1", ["cm"], "ncm_acc", COSINE_2, "student"),
    "stage1-k1": ("stage1", ["cm"], "ncm_acc", COSINE_2, "student"),
    "stage2-refilled": ("refilled", ["ce", "teach"], "test_acc", MULTISTEP_2, "student"),
    "stage2-refilled-minus": ("refilled-minus", ["ce", "teach"], "test_acc", MULTISTEP_2, "student"),
    "stage2-refilled-emb": ("refilled-emb", ["ce", "teach"], "test_acc", MULTISTEP_2, "student"),
    "stage2-batch": ("refilled", ["ce", "teach"], "test_acc", MULTISTEP_2, "student"),
    "baseline-student": ("student", ["ce"], "test_acc", MULTISTEP_2, "student"),
    "baseline-rkd": ("rkd", ["ce", "rkd_distance", "rkd_angle"], "test_acc", MULTISTEP_2, "student"),
    "baseline-aml": ("aml", ["ce", "aml"], "test_acc", MULTISTEP_2, "student"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_run_outputs(chain, name):
    method, terms, metric, lrs, task = RUNS[name]
    stdout = ok(chain.results[name])
    run = chain.dirs[name]
    split = chain.split
    classes = split[f"{task}_classes"]
    assert f"{method} ({task} task) {ARCH} seed 0" in stdout

    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["arch"] == ARCH and "kind" not in summary
    assert summary["seed"] == 0 and summary["epochs"] == EPOCHS and summary["task"] == task
    assert summary["split"] == {"path": str(chain.split_path), **split}
    assert summary["optim"]["batch_size"] == 8
    assert summary["data"]["train"]["n_images"] == N_TRAIN * 2 and summary["data"]["test"]["n_images"] == N_TEST * 2
    assert 0.0 <= summary[metric] <= 1.0

    rows = read_rows(run / "metrics.csv")
    trains_head = method != "stage1"    # stage 1 trains the embedding only: no head accuracy to report
    assert header(run / "metrics.csv") == ["epoch", "lr", *terms, "loss", *["train_acc"] * trains_head, metric,
                                           "seconds"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [float(r["lr"]) for r in rows] == pytest.approx(lrs)
    for r in rows:
        values = [float(r[t]) for t in terms]
        assert all(np.isfinite(values))
        assert float(r["loss"]) == pytest.approx(sum(values), abs=1e-5)
        assert not trains_head or 0.0 <= float(r["train_acc"]) <= 1.0
    assert float(rows[-1][metric]) == summary[metric]

    model, meta = load_model(run / "model.pt")
    assert meta["arch"] == ARCH and meta["classes"] == classes and meta["num_classes"] == len(classes)
    assert not (run / "resume.pt").exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    # The reported accuracy is the saved model's, recomputed here from the raw files.
    ds = load_dataset("fashion-mnist", chain.root, verify_checksums=False)
    if metric == "test_acc":
        _, images, labels = task_images(ds.test, classes)
        acc = (forward(model, images).logits.argmax(1) == labels).float().mean().item()
        assert summary["test_acc"] == pytest.approx(acc, abs=1e-6)
    else:
        _, tr_images, tr_labels = task_images(ds.train, classes)
        _, te_images, te_labels = task_images(ds.test, classes)
        tr = F.normalize(forward(model, tr_images).embedding, dim=1)
        means = F.normalize(torch.stack([tr[tr_labels == k].mean(0) for k in range(len(classes))]), dim=1)
        pred = (F.normalize(forward(model, te_images).embedding, dim=1) @ means.T).argmax(1)
        assert summary["ncm_acc"] == pytest.approx((pred == te_labels).float().mean().item(), abs=1e-6)


def test_stage1_records_k_hat(chain):
    for name, k in (("stage1-inf", None), ("stage1-k1", 1)):
        ok(chain.results[name])
        summary = json.loads((chain.dirs[name] / "summary.json").read_text())
        assert summary["params"]["k_hat"] == k
        assert summary["params"]["teacher"] == str(chain.dirs["teacher"] / "model.pt")


def test_stage1_rejects_k_hat_zero(chain, tmp_path):
    rc, _, err = cli(["train-stage1", *map(str, chain.common()), "--teacher", "t.pt", "--k-hat", "0",
                      "--out", tmp_path / "x"])
    assert rc == 2 and "method stage1" in err and "k_hat='0'" in err and "an integer >= 1 or inf" in err
    assert not (tmp_path / "x").exists()


def test_teach_term_per_variant(chain):
    teach = {}
    for variant in ("refilled", "refilled-minus", "refilled-emb"):
        ok(chain.results[f"stage2-{variant}"])
        teach[variant] = [float(r["teach"]) for r in read_rows(chain.dirs[f"stage2-{variant}"] / "metrics.csv")]
    assert all(t == 0.0 for t in teach["refilled-emb"])
    assert all(t > 0.0 for t in teach["refilled-minus"])
    assert all(t > 0.0 for t in teach["refilled"])


def test_batch_centers_change_the_teaching_term(chain):
    ok(chain.results["stage2-batch"])
    summary = json.loads((chain.dirs["stage2-batch"] / "summary.json").read_text())
    assert summary["params"]["centers"] == "batch"
    batch = [float(r["teach"]) for r in read_rows(chain.dirs["stage2-batch"] / "metrics.csv")]
    fixed = [float(r["teach"]) for r in read_rows(chain.dirs["stage2-refilled"] / "metrics.csv")]
    assert all(t > 0 for t in batch)
    assert batch != fixed


def test_stage2_starts_from_the_stage1_weights(chain):
    """With --lr 0 SGD never moves a parameter, so stage 2's weights are stage 1's."""
    ok(chain.results["stage2-lr0"])
    s1, _ = load_model(chain.dirs["stage1-inf"] / "model.pt")
    s2, _ = load_model(chain.dirs["stage2-lr0"] / "model.pt")
    p1, p2 = dict(s1.named_parameters()), dict(s2.named_parameters())
    assert p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k


def _lambda_rows(chain, name):
    ok(chain.results[name])
    path = chain.dirs[name] / "lambda_i.csv"
    assert header(path) == ["index", "label", "class", "seen", "confidence", "p_teacher_true", "lambda_i"]
    return read_rows(path)


def test_lambda_dump_of_refilled(chain):
    rows = _lambda_rows(chain, "stage2-refilled")
    split = chain.split
    classes, seen_classes = split["student_classes"], set(split["teacher_classes"])
    ds = load_dataset("fashion-mnist", chain.root, verify_checksums=False)

    # one row per training image of the student task
    idx = torch.tensor([int(r["index"]) for r in rows])
    expected_idx, images, labels = task_images(ds.train, classes)
    assert len(rows) == len(expected_idx) == N_TRAIN * len(classes)
    assert sorted(idx.tolist()) == sorted(expected_idx.tolist())
    for r in rows:
        c = int(ds.train.labels[int(r["index"])])
        assert int(r["class"]) == c
        assert int(r["label"]) == classes.index(c)
        assert int(r["seen"]) == int(c in seen_classes)
    assert {int(r["seen"]) for r in rows} == {0, 1}, "the split must have seen and unseen student classes"

    p_csv = torch.tensor([float(r["p_teacher_true"]) for r in rows], dtype=torch.float64)
    w_csv = torch.tensor([float(r["confidence"]) for r in rows], dtype=torch.float64)
    lam = torch.tensor([float(r["lambda_i"]) for r in rows], dtype=torch.float64)

    # independent recomputation from the raw files and the teacher's model.pt (docs/method.md, [C wgkd]):
    # w_i = -log max_k p_T(k|x_i) of the teacher's own head; per training batch (batch size 8, epoch 0's
    # seeded order), w~ = (w - min) / (max - min); lambda_i = lam * 2 sigmoid(-w~), lam = 2
    from refilled.data.streams import epoch_generator

    teacher, meta = load_model(chain.dirs["teacher"] / "model.pt")
    assert meta["classes"] == split["teacher_classes"]
    order = {int(i): k for k, i in enumerate(expected_idx)}
    mine = [order[int(i)] for i in idx]
    out = forward(teacher, images)
    w = -out.logits.double().log_softmax(1).max(1).values
    assert (w[mine] - w_csv).abs().max().item() < 1e-4
    lam_mine = torch.zeros(len(w), dtype=torch.float64)
    perm = torch.randperm(len(w), generator=epoch_generator(0, 0))   # positions in the task's split order
    for start in range(0, len(w), 8):
        b = perm[start:start + 8].tolist()
        lo, hi = min(w[b].tolist()), max(w[b].tolist())
        for i in b:
            tilde = 0.0 if hi == lo else (float(w[i]) - lo) / (hi - lo)
            lam_mine[i] = 2 * 2 / (1 + math.exp(tilde))
    assert (lam_mine[mine] - lam).abs().max().item() < 1e-4, (lam_mine[mine] - lam).abs().max()
    assert lam.max() - lam.min() > 1e-2, lam   # the check means something only if lambda_i varies
    emb = out.embedding.double()
    centres = F.normalize(torch.stack([emb[labels == k].mean(0) for k in range(len(classes))]), dim=1)
    p_all = (emb @ centres.T).softmax(1).gather(1, labels[:, None]).squeeze(1)   # tau2 = 1
    assert (p_all[mine] - p_csv).abs().max().item() < 1e-4, (p_all[mine] - p_csv).abs().max()


@pytest.mark.parametrize("name,expected", [("stage2-refilled-minus", 2.0), ("stage2-refilled-emb", 0.0)])
def test_lambda_dump_of_constant_variants(chain, name, expected):
    rows = _lambda_rows(chain, name)
    ref = _lambda_rows(chain, "stage2-refilled")
    assert len(rows) == len(ref) == N_TRAIN * 2
    assert all(float(r["lambda_i"]) == expected for r in rows)
    # p_T does not depend on the variant
    assert [r["p_teacher_true"] for r in rows] == [r["p_teacher_true"] for r in ref]


def test_ncm_command_agrees_with_stage1_summary(chain, tmp_path):
    ok(chain.results["stage1-inf"])
    summary = json.loads((chain.dirs["stage1-inf"] / "summary.json").read_text())
    out = tmp_path / "ncm.json"
    stdout = ok(cli(["ncm", "--split", chain.split_path, "--model", chain.dirs["stage1-inf"] / "model.pt",
                     "--data-root", chain.root, "--no-checksum", "--device", "cpu", "--out", out]))
    result = json.loads(out.read_text())
    assert result["ncm_acc"] == pytest.approx(summary["ncm_acc"], abs=1e-6)
    assert result["classes"] == chain.split["student_classes"] and result["n_train"] == 2 * N_TRAIN
    assert str(chain.split["student_classes"]) in stdout


# ------------------------------------------------------------------------------------------------
# 5. errors
# ------------------------------------------------------------------------------------------------


def test_stage2_init_of_another_arch(chain):
    ok(chain.results["stage1-inf"])
    out = chain.base / "runs" / "err-arch"
    err = failed(cli(["train-stage2", *chain.common(arch="wrn-16-1"), "--teacher", chain.dirs["teacher"] / "model.pt",
                      "--init", chain.dirs["stage1-inf"] / "model.pt", "--variant", "refilled", "--out", out]))
    assert "wrn-10-1" in err and "wrn-16-1" in err
    assert not (out / "summary.json").exists() and not (out / "model.pt").exists()


def test_stage1_teacher_of_another_split(chain):
    other_split = chain.base / "split-seed1.json"
    ok(cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 1, "--classes-per-task", 2,
            "--out", other_split]))
    other = json.loads(other_split.read_text())
    assert other["teacher_classes"] != chain.split["teacher_classes"]
    other_teacher = chain.run("teacher-seed1", "train-teacher", epochs=1, split=other_split)
    ok(chain.results["teacher-seed1"])
    out = chain.base / "runs" / "err-split"
    err = failed(cli(["train-stage1", *chain.common(), "--teacher", other_teacher / "model.pt", "--out", out]))
    assert str(other["teacher_classes"]) in err and str(chain.split["teacher_classes"]) in err
    assert not (out / "summary.json").exists()


class Payload:
    """Unpickling this creates `marker`: what a malicious model file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_file_with_pickle_payload_is_refused(chain, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"arch": ARCH, "num_classes": 2, "classes": chain.split["teacher_classes"],
                "state_dict": {}, "x": Payload(marker)}, evil)
    assert not marker.exists()
    out = tmp_path / "run"
    for command in (["train-stage1", *chain.common(), "--teacher", evil],
                    ["train-baseline", *chain.common(), "--method", "rkd", "--teacher", evil],
                    ["ncm", "--split", chain.split_path, "--model", evil, "--data-root", chain.root, "--no-checksum",
                     "--device", "cpu"]):
        err = failed(cli([*command, "--out", out]))
        assert str(evil) in err and "refusing" in err
        assert not marker.exists(), "the payload ran"
    assert not (out / "summary.json").exists()
    # the payload is live: an unrestricted load does run it (so the check above can fail)
    torch.load(evil, weights_only=False)["x"].close()
    assert marker.exists()


def test_hand_edited_split_is_refused(chain, tmp_path):
    split = chain.split
    split["student_classes"] = split["student_classes"][::-1]
    edited = tmp_path / "split.json"
    edited.write_text(json.dumps(split))
    out = tmp_path / "run"
    err = failed(cli(["train-teacher", *chain.common(split=edited), "--out", out]))
    assert "student_classes" in err and str(edited) in err
    assert not out.exists()


def test_zero_epochs_is_refused(chain, tmp_path):
    out = tmp_path / "run"
    err = failed(cli(["train-teacher", *chain.common(epochs=0), "--out", out]))
    assert "epochs" in err
    assert not (out / "summary.json").exists()


def test_rkd_without_teacher_is_refused(chain, tmp_path):
    err = failed(cli(["train-baseline", *chain.common(), "--method", "rkd", "--out", tmp_path / "run"]))
    assert "--teacher" in err


# ------------------------------------------------------------------------------------------------
# 6. resume
# ------------------------------------------------------------------------------------------------


def test_rerun_over_a_finished_run_with_another_configuration_is_refused(chain, tmp_path):
    ok(chain.results["teacher"])
    out = tmp_path / "teacher"
    shutil.copytree(chain.dirs["teacher"], out)
    before = (out / "summary.json").read_text()
    err = failed(cli(["train-teacher", *chain.common(epochs=3), "--out", out]))
    assert "another configuration" in err
    assert (out / "summary.json").read_text() == before


def test_rerun_of_a_finished_run_does_nothing(chain, tmp_path, capsys):
    ok(chain.results["teacher"])
    out = tmp_path / "teacher"
    shutil.copytree(chain.dirs["teacher"], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli(["train-teacher", *chain.common(), "--out", out])[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def _start_and_kill(argv: list, out: Path, timeout: float = 120) -> bool:
    """Start `refilled argv --out out`, SIGKILL it as soon as epoch 1's checkpoint is on disk.
    True when it died mid-run (epoch 2 not finished)."""
    with open(out.parent / f"{out.name}.stderr", "w") as log:
        proc = subprocess.Popen([REFILLED, *map(str, argv), "--out", str(out)], stdout=subprocess.DEVNULL,
                                stderr=log)
        deadline = time.monotonic() + timeout
        try:
            # resume.pt is written right after metrics.csv's row, both atomically: poll the later one
            while not (out / "resume.pt").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"run ended or hung before epoch 1 finished: "
                                         f"{(out.parent / f'{out.name}.stderr').read_text()}")
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    root = tmp_path / "data"
    make_learnable_fashion(root, 80, 2)   # 160 teacher images, 20 steps per epoch: epoch 2 takes a moment
    split = tmp_path / "split.json"
    ok(cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 0, "--classes-per-task", 2,
            "--out", split]))
    argv = ["train-teacher", "--split", split, "--arch", ARCH, "--data-root", root, "--no-checksum",
            "--epochs", 2, "--batch-size", 8, "--device", "cpu", "--seed", 5]

    for attempt in range(3):
        killed = tmp_path / f"killed{attempt}"
        if _start_and_kill(argv, killed):
            break
    else:
        pytest.fail("could not kill the run between epoch 1 and the end in 3 tries")

    state = load_tensors(killed / "resume.pt")
    assert state["epoch"] == 1
    rows_before = read_rows(killed / "metrics.csv")
    assert [int(r["epoch"]) for r in rows_before] == [1]
    assert not (killed / "model.pt").exists()

    # Same directory, another configuration (the fingerprint includes the epochs): refused, nothing touched.
    other = tmp_path / "other-config"
    shutil.copytree(killed, other)
    before = snapshot(other)
    err = failed(cli([*argv[:argv.index("--epochs")], "--epochs", 3, *argv[argv.index("--epochs") + 2:],
                      "--out", other]))
    assert "another configuration" in err and str(other / "resume.pt") in err
    assert snapshot(other) == before

    # Same configuration: continues after epoch 1.
    ok(cli([*argv, "--out", killed]))
    rows = read_rows(killed / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0] == rows_before[0], "epoch 1 must come from the checkpoint (same row, same seconds), not a rerun"
    assert not (killed / "resume.pt").exists()
    assert json.loads((killed / "summary.json").read_text())["epochs"] == 2

    straight = tmp_path / "straight"
    ok(cli([*argv, "--out", straight]))
    ref_rows = read_rows(straight / "metrics.csv")
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [drop(r) for r in rows] == [drop(r) for r in ref_rows]
    a = load_tensors(killed / "model.pt")["state_dict"]
    b = load_tensors(straight / "model.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between the resumed and the uninterrupted run"
