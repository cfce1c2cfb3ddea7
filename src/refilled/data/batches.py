"""Mini-batches for one task: the chosen classes of a dataset, relabelled 0..h-1.

In-memory datasets (Fashion-MNIST, CIFAR-100) stay uint8 on the training device and are
augmented batch-wise there (random crop from a zero-padded image, horizontal flip), so
the CPU and CUDA paths run the same code. CUB (files) on CUDA: decoded once into a uint8
cache (`refilled.data.augment`, stored in `refilled.data.augment.default_cache_dir()`) and augmented
batch-wise on the GPU (RandomResizedCrop + flip; Resize + CenterCrop for evaluation); on
the CPU, by default, per-image PIL transforms through a DataLoader (``gpu_augment=True``
takes the cached path there too).
Every random draw comes from a generator seeded by (seed, epoch): an epoch's batches do
not depend on what ran before it, which is what makes resume exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from refilled.data.cub200 import FileImageDataset, cub_transforms
from refilled.data.datasets import ArraySplit, Dataset, FileSplit
from refilled.data.splits import indices_digest, subsample_per_class
from refilled.data.streams import epoch_generator


@dataclass
class TaskSplit:
    """The images of `classes` (original ids, in task-label order) with task labels."""

    source: ArraySplit | FileSplit
    indices: torch.Tensor      # rows of `source` used
    labels: torch.Tensor       # task labels 0..h-1, aligned with `indices`
    classes: list[int]

    def describe(self) -> dict:
        return {"n_images": len(self.indices), "indices_sha256_16": indices_digest(self.indices)}


def task_split(source: ArraySplit | FileSplit, classes: list[int], per_class: int | None = None, seed: int = 0,
               exclude: torch.Tensor | None = None) -> TaskSplit:
    """`per_class` seeded images of each class (all when None), never one of the rows `exclude`."""
    labels = source.labels
    if exclude is not None and len(exclude):
        labels = labels.clone()
        labels[exclude] = -1
    indices = subsample_per_class(labels, classes, per_class, seed)
    to_task = torch.full((int(source.labels.max()) + 1,), -1, dtype=torch.long)
    to_task[torch.tensor(classes)] = torch.arange(len(classes))
    return TaskSplit(source, indices, to_task[source.labels[indices]], list(classes))


def train_val_split(source: ArraySplit | FileSplit, classes: list[int], per_class: int | None, val_per_class: int,
                    seed: int) -> tuple[TaskSplit, TaskSplit]:
    """A held-out validation split of `val_per_class` training images per class (its own seeded
    draw), and the training subsample drawn from the rest."""
    val = task_split(source, classes, val_per_class, seed + 1_000_003)
    return task_split(source, classes, per_class, seed, exclude=val.indices), val


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded image and horizontal flip with p = 0.5.

    `images` is [B, C, H, W] (any dtype, any device); the draws are made on the CPU
    generator and moved, so CPU and CUDA see the same crops for the same seed.
    """
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    draws = torch.cat([offsets, flip[None].long()])
    if images.device.type == "cuda":  # one pinned, asynchronous copy instead of three synchronous ones
        draws = draws.pin_memory().to(images.device, non_blocking=True)
    dy, dx, flip = draws[0], draws[1], draws[2].bool()
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)                 # [B, H]
    cols = dx[:, None] + torch.arange(w, device=images.device)                 # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def decode_workers() -> int:
    """Worker processes for the one-off decode of an image folder: the cores we may use, up to 8."""
    return min(8, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else min(8, os.cpu_count() or 1)


class Batches:
    """Iterable over (images float32 normalised, task labels) on `device` for one epoch."""

    def __init__(self, split: TaskSplit, dataset: Dataset, batch_size: int, train: bool, device: torch.device,
                 seed: int = 0, pad: int = 4, num_workers: int = 0, gpu_augment: bool | None = None,
                 cache_dir=None):
        self.split, self.batch_size, self.train = split, batch_size, train
        self.device, self.seed, self.pad, self.num_workers = torch.device(device), seed, pad, num_workers
        self.epoch = 0
        self.in_memory = isinstance(split.source, ArraySplit)
        self.mean = torch.tensor(dataset.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(dataset.std, device=self.device).view(1, 3, 1, 1) * 255
        self.cached = None       # files augmented on the device: a CachedImageBatches
        if self.in_memory:
            self.images = split.source.images[split.indices].to(self.device)
            self.labels = split.labels.to(self.device)
        elif (self.device.type == "cuda") if gpu_augment is None else gpu_augment:
            from refilled.data import augment

            self.cached = augment.cached_file_batches(
                split, dataset, batch_size, train, self.device, seed, cache_dir=cache_dir or augment.default_cache_dir(),
                num_workers=num_workers or decode_workers())
        else:
            sub = FileSplit([split.source.paths[i] for i in split.indices.tolist()], split.labels)
            self.files = FileImageDataset(sub, cub_transforms(train))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split.indices)
        # Training drops the last partial batch so every step has the same shape.
        return n // self.batch_size if self.train and n >= self.batch_size else -(-n // self.batch_size)

    def __iter__(self):
        if self.in_memory:
            yield from self._iter_memory()
        elif self.cached is not None:
            self.cached.set_epoch(self.epoch)
            yield from self.cached
        else:
            yield from self._iter_files()

    def _iter_memory(self):
        g = epoch_generator(self.seed, self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g).to(self.device) if self.train else torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = random_crop_flip(x, self.pad, g)
            yield (x.float() - self.mean) / self.std, self.labels[idx]

    def _iter_files(self):
        # PIL transforms draw from torch's global RNG inside workers; seed them per epoch.
        g = epoch_generator(self.seed, self.epoch)
        loader = torch.utils.data.DataLoader(
            self.files, batch_size=self.batch_size, shuffle=self.train, drop_last=self.train and len(self.files) >= self.batch_size,
            num_workers=self.num_workers, generator=g, pin_memory=self.device.type == "cuda",
            worker_init_fn=None, persistent_workers=False,
        )
        if self.num_workers == 0:
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def balanced_split(source: ArraySplit | FileSplit, old_classes: list[int], new_classes: list[int],
                   per_class: int | None, seed: int) -> tuple[TaskSplit, dict]:
    """The balanced test set of the joint label space: `per_class` seeded images of every class
    in `old_classes` (C' \\ C) and in `new_classes` (C); None: as many as the rarest of them
    has. Labels are joint indices (old classes first, then new). Returns the split and its
    record (seed, per-class counts, digest) for summary.json."""
    shared = sorted(set(old_classes) & set(new_classes))
    if shared:
        raise ValueError(f"balanced_split: old classes must exclude the student's classes; shared: {shared}")
    classes = list(old_classes) + list(new_classes)
    available = {c: int((source.labels == c).sum()) for c in classes}
    n = min(available.values()) if per_class is None else int(per_class)
    short = {c: k for c, k in available.items() if k < n}
    if short:
        raise ValueError(f"balanced test set: {n} images per class asked, but classes {short} have fewer")
    split = task_split(source, classes, n, seed)
    counts = {str(c): int((split.labels == j).sum()) for j, c in enumerate(classes)}
    return split, {"seed": seed, "per_class": n, "old_classes": list(old_classes), "new_classes": list(new_classes),
                   "counts": counts, **split.describe()}
