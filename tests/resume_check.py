"""Kill a training run between epochs and call it again, shared by the resume tests of the
training loop and of every method.

Training is deterministic from the seed, so a second call that starts over from epoch 0 ends on
the same weights as one that resumes: equal weights alone cannot tell them apart. What does is
how many epochs the second call trains, and whether the rows the killed run wrote to
metrics.csv (their `seconds` included, which a rerun would measure anew) are kept as they were.
"""

import csv
from pathlib import Path
from unittest import mock

import pytest

import refilled.training.loop as train_mod
from refilled.io import load_tensors


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def kill_then_resume(run, run_dir: Path, epochs: int, killed_in_epoch: int = 2):
    """`run(run_dir)` trains `epochs` epochs into run_dir. The first call dies inside epoch
    `killed_in_epoch` (after one batch); the second must resume after the last finished epoch.
    Checks that, and returns what the second call returned."""
    real = train_mod._train_epoch
    started = []

    def dies(method, batches, *args, **kwargs):
        started.append(1)
        if len(started) == killed_in_epoch:
            next(iter(batches))           # some of the epoch's work happens, then the process dies
            raise KeyboardInterrupt("killed")
        return real(method, batches, *args, **kwargs)

    with mock.patch.object(train_mod, "_train_epoch", dies), pytest.raises(KeyboardInterrupt):
        run(run_dir)
    finished = killed_in_epoch - 1
    saved = load_tensors(Path(run_dir) / "resume.pt")["epoch"]
    assert saved == finished, f"the killed run's checkpoint is of epoch {saved}, not {finished}"
    before = metrics_rows(run_dir)
    assert [int(r["epoch"]) for r in before] == list(range(1, finished + 1)), before

    trained = []

    def counting(*args, **kwargs):
        trained.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(train_mod, "_train_epoch", counting):
        result = run(run_dir)
    assert len(trained) == epochs - finished, \
        f"the second call trained {len(trained)} epochs: it must resume after epoch {finished}, not start over"
    after = metrics_rows(run_dir)
    assert [int(r["epoch"]) for r in after] == list(range(1, epochs + 1)), f"metrics.csv after the resume: {after}"
    assert after[:finished] == before, "the killed run's metrics rows (seconds included) must be kept, not rerun"
    return result
