"""The λ_i dump (lambda_i.csv) of a stage-2 run trained with per-batch class centres
(`train-stage2 --centers batch`): training used centres from each batch, but wherever the
dump uses centres (p_teacher_true, the local classifier over all student classes, and λ_i
under `weighting: true-class`) they are, as in the fixed-centre run, the teacher's class
centres of all the student's un-augmented training images, computed before training (docs/method.md,
protocol choices). Checked against an independent recomputation of p_teacher_true from the raw
files and the teacher's model.pt, and against the dump of the same run with fixed centres
(the dump must not depend on the centre mode), for the default weighting and for true-class.

Tiny fake Fashion-MNIST on the CPU (the chain of tests/test_cli.py, shortened: teacher,
stage 1, stage 2 twice)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_runner import cli, ok
from cpu_pin import one_cpu  # noqa: F401 (autouse: this module runs on one CPU)
from fakedata import idx_bytes, make_fashion_idx, write_maybe_gz
from refilled.training.checkpoints import load_model
from refilled.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_dataset

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 16, 4        # per class


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lambda-dump")
    root = base / "data"
    fake = make_fashion_idx(root, N_TRAIN, N_TEST, gz=False, seed=0)
    for prefix in ("train", "t10k"):   # a weak brightness by label: p_T(y|x) varies, and so do class means
        images = fake[f"{prefix}_images"] // 2 + 6 * fake[f"{prefix}_labels"][:, None, None]
        write_maybe_gz(fake["dir"] / f"{prefix}-images-idx3-ubyte", idx_bytes(images.astype(np.uint8)), False)
    split = base / "split.json"
    ok(cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 0, "--classes-per-task", 2,
            "--out", split]))
    common = ["--split", split, "--arch", "wrn-10-1", "--data-root", root, "--no-checksum", "--batch-size", 8,
              "--device", "cpu"]
    dirs = {name: base / "runs" / name for name in ("teacher", "stage1", "batch", "fixed", "batch-tc", "fixed-tc")}
    ok(cli(["train-teacher", *common, "--epochs", 2, "--out", dirs["teacher"]]))
    teacher = dirs["teacher"] / "model.pt"
    ok(cli(["train-stage1", *common, "--epochs", 1, "--teacher", teacher, "--out", dirs["stage1"]]))
    s1 = dirs["stage1"] / "model.pt"
    alias = ["train-stage2", "--variant", "refilled"]      # the spelling: --centers batch
    train = ["train", "--method", "refilled"]               # the catalog's: --set centers=batch
    for name, command in (("batch", [*alias, "--centers", "batch"]), ("fixed", alias),
                          ("batch-tc", [*train, "--set", "centers=batch", "--set", "weighting=true-class"]),
                          ("fixed-tc", [*train, "--set", "weighting=true-class"])):
        ok(cli([*command, *common, "--epochs", 2, "--teacher", teacher, "--init", s1, "--out", dirs[name]]))
    return {"root": root, "split": json.loads(split.read_text()), "dirs": dirs}


def _teacher_p_true(runs, tau: float, centre_images=None):
    """(dataset index -> p_T(y_i | x_i)) from the teacher's model.pt and the raw images: class
    centres = L2-normalised means of the teacher's raw embeddings of the student's training
    images of each class (or of the `centre_images` subset of them), softmax of
    <embedding, centre> / tau over all student classes."""
    split = runs["split"]
    classes = split["student_classes"]
    ds = load_dataset("fashion-mnist", runs["root"], verify_checksums=False)
    idx = torch.cat([torch.nonzero(ds.train.labels == c).flatten() for c in classes])
    labels = torch.tensor([classes.index(int(ds.train.labels[i])) for i in idx])
    mean = torch.tensor(FASHION_MNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FASHION_MNIST_STD).view(1, 3, 1, 1)
    teacher, _ = load_model(runs["dirs"]["teacher"] / "model.pt")
    teacher.eval()
    with torch.no_grad():
        emb = teacher((ds.train.images[idx].float() / 255 - mean) / std).embedding.double()
    use = torch.arange(len(idx)) if centre_images is None else centre_images(labels)
    centres = torch.stack([emb[use][labels[use] == k].mean(0) for k in range(len(classes))])
    centres = centres / centres.norm(dim=1, keepdim=True)
    logits = emb @ centres.T / tau
    p = torch.exp(logits - logits.max(1, keepdim=True).values)
    p = (p / p.sum(1, keepdim=True)).gather(1, labels[:, None]).squeeze(1)
    return {int(i): float(v) for i, v in zip(idx, p)}


def _params(runs, name) -> dict:
    return json.loads((runs["dirs"][name] / "summary.json").read_text())["params"]


@pytest.mark.parametrize("batch,fixed", [("batch", "fixed"), ("batch-tc", "fixed-tc")])
def test_batch_centres_run_trained_with_batch_centres(runs, batch, fixed):
    assert _params(runs, batch)["centers"] == "batch" and _params(runs, fixed)["centers"] == "fixed"
    teach = lambda name: [float(r["teach"]) for r in _rows(runs["dirs"][name] / "metrics.csv")]
    assert teach(batch) != teach(fixed), "the centre mode did not change training, so the dump test says nothing"


@pytest.mark.parametrize("name", ["batch", "batch-tc"])
def test_lambda_dump_under_batch_centres_uses_the_centres_of_all_training_images(runs, name):
    rows = _rows(runs["dirs"][name] / "lambda_i.csv")
    params = _params(runs, name)
    expected = _teacher_p_true(runs, params["tau"])
    assert sorted(int(r["index"]) for r in rows) == sorted(expected)          # every training image, once
    seen = set(runs["split"]["teacher_classes"])
    assert all(int(r["seen"]) == int(int(r["class"]) in seen) for r in rows)
    p_csv = {int(r["index"]): float(r["p_teacher_true"]) for r in rows}
    assert max(abs(p_csv[i] - expected[i]) for i in expected) < 1e-5      # 6 decimals in the file, float32
    if params["weighting"] == "true-class":    # λ_i = λ p_T(y_i | x_i) of the batch's classes (here: both)
        assert all(abs(float(r["lambda_i"]) - params["lam"] * float(r["p_teacher_true"])) < 3e-6 for r in rows)
    # the check can tell centres apart: those of a few images per class (a batch's) give other p_T
    few = _teacher_p_true(runs, params["tau"], lambda labels: torch.cat([torch.arange(len(labels))[labels == k][:2]
                                                          for k in range(int(labels.max()) + 1)]))
    assert max(abs(few[i] - expected[i]) for i in expected) > 1e-4
    assert max(p_csv.values()) - min(p_csv.values()) > 1e-2, "p_T nearly constant: the check means little"


@pytest.mark.parametrize("batch,fixed", [("batch", "fixed"), ("batch-tc", "fixed-tc")])
def test_lambda_dump_does_not_depend_on_the_centre_mode(runs, batch, fixed):
    a = {r["index"]: r for r in _rows(runs["dirs"][batch] / "lambda_i.csv")}
    b = {r["index"]: r for r in _rows(runs["dirs"][fixed] / "lambda_i.csv")}
    assert a.keys() == b.keys()
    for column in ("p_teacher_true", "lambda_i"):
        assert all(abs(float(a[i][column]) - float(b[i][column])) < 2e-6 for i in a), column
