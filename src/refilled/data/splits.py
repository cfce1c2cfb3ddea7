"""Class-overlap splits for generalized knowledge distillation (docs/method.md, "Split").

A class order pi of the N classes is fixed. With h classes per task and overlap ratio r,
the teacher learns C' = pi[0:h] and the student C = pi[h(1-r) : h(2-r)], so
|C| = |C'| = h and |C & C'| = r*h. One teacher serves every ratio.

Two orders (``class_order``):

- ``"seeded"``: a permutation drawn from the seed, so the seed varies the task too (the
  only choice for Fashion-MNIST, which has no published order).
- ``"authors"``: the authors' fixed order (GKD ``utils/split_class.py``): CUB-200 in its
  own class-id order; CIFAR-100 the CIFAR-FS class split (Bertinetto et al. 2019) in three
  parts, train (64), val (16), test (20), each sorted by CIFAR-100 fine-label id and
  concatenated. Seeds then vary initialisation and data order only.

This module imports no torch at module level (``refilled split`` must not need it); the
two helpers that work on tensors import it when called.
"""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NUM_CLASSES = {"fashion-mnist": 10, "cifar100": 100, "cub200": 200}

CLASS_ORDERS = ("seeded", "authors")

# CIFAR-100 fine-label names in fine-label-id order (the official ``meta`` file's
# ``fine_label_names``; alphabetical).
CIFAR100_FINE_LABELS: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# CIFAR-FS (Bertinetto et al. 2019) validation and test classes, as published (e.g.
# torchmeta's datasets/assets/cifar100/cifar-fs/{val,test}.json); train = the other 64.
CIFAR_FS_VAL: tuple[str, ...] = (
    "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
    "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
)
CIFAR_FS_TEST: tuple[str, ...] = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
    "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
)


class SplitError(ValueError):
    pass


def valid_ratios(classes_per_task: int) -> list[float]:
    return [k / classes_per_task for k in range(classes_per_task + 1)]


def shared_classes(ratio: float, classes_per_task: int) -> int | None:
    """r * h if it is a whole number in [0, h] (the split rule's condition), else None."""
    shared = Fraction(ratio).limit_denominator(10_000) * classes_per_task
    return int(shared) if shared.denominator == 1 and 0 <= shared <= classes_per_task else None


def classes_needed(classes_per_task: int, shared: int) -> int:
    """Classes the teacher's and the student's tasks cover together, 2h - r*h: the split rule's
    limit is that the dataset has that many (h <= N/2 for every ratio; h = N with r = 1 is
    standard KD, Table 3, where both tasks are every class)."""
    return 2 * classes_per_task - shared


def shared_class_count(ratio: float, classes_per_task: int) -> int:
    shared = shared_classes(ratio, classes_per_task)
    if shared is None:
        allowed = ", ".join(f"{r:g}" for r in valid_ratios(classes_per_task))
        raise SplitError(
            f"ratio {ratio:g} does not give a whole number of shared classes with "
            f"{classes_per_task} classes per task; valid ratios: {allowed}"
        )
    return shared


def class_permutation(num_classes: int, seed: int) -> list[int]:
    # Python's own Mersenne Twister: the same permutation on every torch version.
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    return order


def authors_class_order(dataset: str) -> list[int]:
    """The authors' fixed class order (GKD ``utils/split_class.py``, ``label_q``)."""
    if dataset == "cub200":
        return list(range(NUM_CLASSES["cub200"]))
    if dataset == "cifar100":
        ids = {name: i for i, name in enumerate(CIFAR100_FINE_LABELS)}
        val = sorted(ids[n] for n in CIFAR_FS_VAL)
        test = sorted(ids[n] for n in CIFAR_FS_TEST)
        held = set(val) | set(test)
        train = [i for i in range(len(CIFAR100_FINE_LABELS)) if i not in held]
        return train + val + test
    raise SplitError(
        f"class_order 'authors' exists only for cifar100 and cub200 (the authors published no class "
        f"order for {dataset}); use class_order 'seeded'"
    )


def check_class_names(dataset: str, names, source: str = "dataset") -> None:
    """The authors' CIFAR-100 order is defined by fine-label *names*: the loaded meta file's
    ``fine_label_names`` (index = label id) must be :data:`CIFAR100_FINE_LABELS`, else the
    ids of the fixed order would point at other classes. No-op for other datasets."""
    if dataset != "cifar100":
        return
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    if names != list(CIFAR100_FINE_LABELS):
        diff = next((i for i, (a, b) in enumerate(zip(names, CIFAR100_FINE_LABELS)) if a != b), min(len(names), 100))
        got = names[diff] if diff < len(names) else "<missing>"
        want = CIFAR100_FINE_LABELS[diff] if diff < 100 else "<nothing>"
        raise SplitError(f"{source}: CIFAR-100 fine_label_names differ from the official list at id {diff} "
                         f"({got!r}, expected {want!r}); the authors' class order cannot be applied")


def make_split(dataset: str, ratio: float, seed: int, classes_per_task: int | None = None,
               class_order: str = "seeded") -> dict:
    if dataset not in NUM_CLASSES:
        raise SplitError(f"unknown dataset {dataset!r}; known: {', '.join(NUM_CLASSES)}")
    if class_order not in CLASS_ORDERS:
        raise SplitError(f"unknown class_order {class_order!r}; known: {', '.join(CLASS_ORDERS)}")
    n = NUM_CLASSES[dataset]
    h = n // 2 if classes_per_task is None else classes_per_task
    if not 1 <= h <= n:
        raise SplitError(f"classes_per_task {h} must be between 1 and {n} for {dataset} ({n} classes)")
    shared = shared_class_count(ratio, h)
    if classes_needed(h, shared) > n:
        raise SplitError(f"classes_per_task {h} at ratio {ratio:g}: teacher and student together need "
                         f"{classes_needed(h, shared)} classes, {dataset} has {n} (h <= {n // 2} for every ratio, or r = 1)")
    pi = authors_class_order(dataset) if class_order == "authors" else class_permutation(n, seed)
    return {
        "dataset": dataset,
        "ratio": ratio,
        "seed": seed,
        "classes_per_task": h,
        "class_order": class_order,
        "teacher_classes": pi[:h],
        "student_classes": pi[h - shared : 2 * h - shared],
    }


def check_split(split: dict, source: str = "split") -> dict:
    """Validate a split read from disk against the rule that makes it.

    A split without ``class_order`` (written before the key existed) is a seeded one."""
    keys = ("dataset", "ratio", "seed", "classes_per_task", "teacher_classes", "student_classes")
    missing = [k for k in keys if k not in split]
    if missing:
        raise SplitError(f"{source}: missing key(s) {', '.join(missing)}")
    order = split.get("class_order", "seeded")
    try:
        expected = make_split(split["dataset"], split["ratio"], split["seed"], split["classes_per_task"], order)
    except SplitError as exc:
        raise SplitError(f"{source}: {exc}") from None
    for key in ("teacher_classes", "student_classes"):
        if list(split[key]) != expected[key]:
            raise SplitError(f"{source}: {key} {split[key]} does not match the split rule (expected {expected[key]})")
    return split


def subsample_per_class(labels: torch.Tensor, classes: list[int], per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of (up to) `per_class` seeded images of each class, in class-then-index order."""
    import torch

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
    import torch

    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
