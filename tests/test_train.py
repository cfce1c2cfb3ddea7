"""The training loop: schedules, augmentation, metrics, and exact resume after a kill."""

import csv
import math

import pytest
from fakedata import tiny_dataset
from resume_check import kill_then_resume
import torch

from refilled.data.batches import Batches, random_crop_flip, task_split
from refilled.evaluate import accuracy
from refilled.io import load_tensors
from refilled.methods.student import Student
from refilled.models import build_model
from refilled.training.loop import OptimConfig, fit, lr_at

CPU = torch.device("cpu")


def test_multistep_and_cosine_schedules():
    cfg = OptimConfig(epochs=10, lr=0.1)
    assert [lr_at(cfg, e) for e in (0, 4, 5, 6, 7, 8, 9)] == pytest.approx([.1, .1, .02, .02, .004, .004, .0008])
    assert lr_at(OptimConfig(epochs=1, lr=0.1), 0) == pytest.approx(0.1)
    e200 = OptimConfig(epochs=200, lr=0.1)  # the paper's 100/140/180
    assert [lr_at(e200, e) for e in (99, 100, 139, 140, 179, 180)] == pytest.approx([.1, .02, .02, .004, .004, .0008])
    cos = OptimConfig(epochs=10, lr=0.1, schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.1)
    assert lr_at(cos, 5) == pytest.approx(0.01 + 0.09 * 0.5)
    assert lr_at(cos, 10) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="epochs"):
        OptimConfig(epochs=-1)


def test_random_crop_flip_stays_inside_padded_image():
    g = torch.Generator().manual_seed(0)
    b, pad = 400, 4
    # each image is a ramp of unique values: any crop is identifiable by its top-left value
    base = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32) + 1
    out = random_crop_flip(base.expand(b, 3, 32, 32), pad, g)
    padded = torch.nn.functional.pad(base, (pad,) * 4)[0, 0]
    flips = 0
    for i in range(b):
        img = out[i, 0]
        found = False
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                window = padded[dy:dy + 32, dx:dx + 32]
                if torch.equal(img, window):
                    found = True
                elif torch.equal(img, window.flip(1)):
                    found, flips = True, flips + 1
        assert found, f"image {i} is not a crop of the padded image"
        assert torch.equal(out[i, 0], out[i, 2])
    # flip with p = .5: binomial(400, .5) has std 10; 4 std is a 6e-5 false alarm
    assert abs(flips - b / 2) < 40


def test_task_split_relabels_in_task_order():
    ds = tiny_dataset()
    ts = task_split(ds.train, [2, 0], per_class=5, seed=1)
    assert ts.labels.tolist() == [0] * 5 + [1] * 5
    assert set(ds.train.labels[ts.indices].tolist()) == {0, 2}
    assert (ds.train.labels[ts.indices][ts.labels == 0] == 2).all()


def _run(tmp_path, epochs, ds, seed=3):
    train = Batches(task_split(ds.train, [0, 1, 2, 3]), ds, 8, True, CPU, seed)
    test = Batches(task_split(ds.test, [0, 1, 2, 3]), ds, 16, False, CPU)
    torch.manual_seed(seed)
    model = build_model("wrn-10-1", 4)
    cfg = OptimConfig(epochs=epochs, batch_size=8, lr=0.05)
    last = fit(Student(model), train, lambda: {"test_acc": accuracy(model, test, CPU)}, cfg, tmp_path, CPU, seed)
    return model, last


def test_metrics_csv_has_one_row_per_epoch(tmp_path):
    _, last = _run(tmp_path, 3, tiny_dataset())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"epoch", "lr", "ce", "loss", "train_acc", "test_acc", "seconds"}
    assert all(math.isfinite(float(r["ce"])) for r in rows)
    assert float(rows[-1]["test_acc"]) == last["test_acc"]
    state = load_tensors(tmp_path / "resume.pt")
    assert state["epoch"] == 3


def test_killed_run_resumes_to_identical_weights(tmp_path):
    ds = tiny_dataset()
    reference, _ = _run(tmp_path / "straight", 4, ds)
    # killed in the middle of epoch 3 (after two finished epochs), then the same call again
    resumed, _ = kill_then_resume(lambda run_dir: _run(run_dir, 4, ds), tmp_path / "killed", 4, killed_in_epoch=3)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"


def test_resume_refuses_a_different_configuration(tmp_path):
    from refilled.io import CheckpointError

    ds = tiny_dataset()
    _run(tmp_path, 1, ds, seed=3)
    with pytest.raises(CheckpointError, match="another configuration"):
        _run(tmp_path, 1, ds, seed=4)


def test_eval_every_evaluates_on_schedule_and_after_the_last_epoch(tmp_path):
    ds = tiny_dataset()
    train = Batches(task_split(ds.train, [0, 1, 2, 3]), ds, 8, True, CPU, 0)
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 4)
    calls = []
    cfg = OptimConfig(epochs=5, batch_size=8, lr=0.05, eval_every=2)
    fit(Student(model), train, lambda: calls.append(1) or {"test_acc": 0.5}, cfg, tmp_path, CPU, 0)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["test_acc"] for r in rows] == ["", "0.5", "", "0.5", "0.5"]
    assert len(calls) == 3
