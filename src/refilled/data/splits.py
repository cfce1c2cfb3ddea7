"""Class-overlap splits for generalized knowledge distillation (method.md, "Split").

A seeded permutation pi of the N classes is fixed per seed. With h classes per task and
overlap ratio r, the teacher learns C' = pi[0:h] and the student C = pi[h(1-r) : h(2-r)],
so |C| = |C'| = h and |C & C'| = r*h. One teacher serves every ratio of a seed.
"""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction

import torch

NUM_CLASSES = {"fashion-mnist": 10, "cifar100": 100, "cub200": 200}


class SplitError(ValueError):
    pass


def valid_ratios(classes_per_task: int) -> list[float]:
    return [k / classes_per_task for k in range(classes_per_task + 1)]


def shared_class_count(ratio: float, classes_per_task: int) -> int:
    shared = Fraction(ratio).limit_denominator(10_000) * classes_per_task
    if shared.denominator != 1 or not 0 <= shared <= classes_per_task:
        allowed = ", ".join(f"{r:g}" for r in valid_ratios(classes_per_task))
        raise SplitError(
            f"ratio {ratio:g} does not give a whole number of shared classes with "
            f"{classes_per_task} classes per task; valid ratios: {allowed}"
        )
    return int(shared)


def class_permutation(num_classes: int, seed: int) -> list[int]:
    # Python's own Mersenne Twister: the same permutation on every torch version.
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    return order


def make_split(dataset: str, ratio: float, seed: int, classes_per_task: int | None = None) -> dict:
    if dataset not in NUM_CLASSES:
        raise SplitError(f"unknown dataset {dataset!r}; known: {', '.join(NUM_CLASSES)}")
    n = NUM_CLASSES[dataset]
    h = n // 2 if classes_per_task is None else classes_per_task
    if not 1 <= h <= n // 2:
        raise SplitError(f"classes_per_task {h} must be between 1 and {n // 2} for {dataset} ({n} classes)")
    shared = shared_class_count(ratio, h)
    pi = class_permutation(n, seed)
    return {
        "dataset": dataset,
        "ratio": ratio,
        "seed": seed,
        "classes_per_task": h,
        "teacher_classes": pi[:h],
        "student_classes": pi[h - shared : 2 * h - shared],
    }


def check_split(split: dict, source: str = "split") -> dict:
    """Validate a split read from disk against the rule that makes it."""
    keys = ("dataset", "ratio", "seed", "classes_per_task", "teacher_classes", "student_classes")
    missing = [k for k in keys if k not in split]
    if missing:
        raise SplitError(f"{source}: missing key(s) {', '.join(missing)}")
    expected = make_split(split["dataset"], split["ratio"], split["seed"], split["classes_per_task"])
    for key in ("teacher_classes", "student_classes"):
        if list(split[key]) != expected[key]:
            raise SplitError(f"{source}: {key} {split[key]} does not match the split rule (expected {expected[key]})")
    return split


def subsample_per_class(labels: torch.Tensor, classes: list[int], per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of (up to) `per_class` seeded images of each class, in class-then-index order."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        if per_class is not None and per_class < len(idx):
            idx = idx[torch.randperm(len(idx), generator=g)[:per_class]].sort().values
        picked.append(idx)
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


def indices_digest(indices: torch.Tensor) -> str:
    """Short fingerprint recorded in summaries so a subsample can be compared across runs."""
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
