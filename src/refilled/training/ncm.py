"""`refilled ncm`: the nearest-class-mean accuracy of a model's embedding (a trained model.pt,
or a network at its random initialisation) on the teacher's or the student's classes of a split."""

from __future__ import annotations

from pathlib import Path

import torch

from refilled.data import load_dataset
from refilled.data.batches import Batches, task_split
from refilled.evaluate import forward_all, ncm_accuracy
from refilled.models import build_model
from refilled.training.checkpoints import load_model
from refilled.training.loop import resolve_device, set_cpu_threads
from refilled.training.run import read_split


def ncm_score(split_path: Path, data_root: Path, task: str, per_class: int | None, seed: int, device: str,
              model_path: Path | None = None, random_init: str | None = None, verify_checksums: bool = True) -> dict:
    """Class means from the task's training images (`per_class` of each, drawn with `seed`),
    accuracy on its test images; the result as `refilled ncm --out` writes it."""
    set_cpu_threads()
    device = resolve_device(device)
    split = read_split(split_path)
    dataset = load_dataset(split["dataset"], data_root, verify_checksums=verify_checksums)
    classes = split[f"{task}_classes"]
    train_b = Batches(task_split(dataset.train, classes, per_class, seed), dataset, 512, False, device)
    test_b = Batches(task_split(dataset.test, classes), dataset, 512, False, device)
    if model_path:
        model, meta = load_model(model_path, device=device)
        source = {"model": str(model_path), "arch": meta["arch"], "trained_on": meta.get("classes")}
    else:
        torch.manual_seed(seed)
        model = build_model(random_init, len(classes)).to(device)
        source = {"random_init": random_init, "seed": seed}
    tr = forward_all(model, train_b, device)
    te = forward_all(model, test_b, device)
    acc = ncm_accuracy(tr[1], tr[2], te[1], te[2], len(classes))
    return {"ncm_acc": acc, "task": task, "seed": seed, "classes": classes, **source,
            "split": str(split_path), "per_class": per_class, "n_train": len(tr[2]), "n_test": len(te[2])}
