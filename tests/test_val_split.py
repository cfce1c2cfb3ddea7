"""The held-out validation split: drawn from the training images (disjoint from the runs'
training subsample, seeded, recorded), it selects an epoch whose test score is reported
beside the final one; the reported number stays the final epoch's."""

import csv
import json

import torch
from cli_runner import cli
from fakedata import make_fashion_idx

from refilled.data import load_dataset
from refilled.data.batches import task_split, train_val_split


def test_validation_images_are_training_images_disjoint_from_the_subsample(tmp_path):
    make_fashion_idx(tmp_path, 12, 2)
    ds = load_dataset("fashion-mnist", tmp_path, verify_checksums=False)
    classes = [3, 7]
    train, val = train_val_split(ds.train, classes, per_class=5, val_per_class=4, seed=1)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    for split, n in ((train, 5), (val, 4)):
        labels = ds.train.labels[split.indices]
        assert sorted(labels.tolist()) == sorted(classes * n)
        assert torch.equal(split.labels, torch.tensor([classes.index(int(c)) for c in labels]))
    again = train_val_split(ds.train, classes, 5, 4, seed=1)
    assert torch.equal(again[1].indices, val.indices) and torch.equal(again[0].indices, train.indices)
    assert not torch.equal(train_val_split(ds.train, classes, 5, 4, seed=2)[1].indices, val.indices)
    # every remaining image when per_class is None
    rest, val = train_val_split(ds.train, classes, None, 4, seed=1)
    assert len(rest.indices) == 2 * 12 - 2 * 4
    assert len(task_split(ds.train, classes).indices) == 2 * 12


def test_run_reports_the_validation_selected_epoch_beside_the_final_one(tmp_path):
    root = tmp_path / "data"
    make_fashion_idx(root, 10, 3)
    split = tmp_path / "split.json"
    assert cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 0, "--classes-per-task", 2,
                "--out", split])[0] == 0
    out = tmp_path / "run"
    rc, _, err = cli(["train", "--method", "student", "--split", split, "--arch", "wrn-10-1", "--data-root", root,
                      "--no-checksum", "--epochs", 3, "--batch-size", 4, "--device", "cpu", "--eval-every", 100,
                      "--val-per-class", 3, "--out", out])
    assert rc == 0, err
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["val_acc"] != "" for r in rows] == [True] * 3        # every epoch evaluated despite --eval-every
    summary = json.loads((out / "summary.json").read_text())
    sel = summary["val_selected"]
    val = [float(r["val_acc"]) for r in rows]
    best = val.index(max(val))                                        # the first of ties
    assert sel["epoch"] == best + 1 and sel["val_acc"] == val[best]
    assert sel["test_acc"] == float(rows[best]["test_acc"])
    assert summary["test_acc"] == float(rows[-1]["test_acc"])         # the reported number: the final epoch
    assert sel["per_class"] == 3 and sel["val"]["n_images"] == 6
    assert summary["data"]["train"]["n_images"] == 2 * 10 - 6
