"""The reference-style side of `refilled bench`: per-sample PIL transforms in DataLoader
workers, fp32, eager `torch.optim.SGD`, `loss.item()` every step (refilled.tools.bench's
docstring says why this is the baseline)."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from refilled.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from refilled.data.cub200 import IMAGENET_MEAN, IMAGENET_STD
from refilled.tools.bench_cases import Case, Config, _Data, build_method, measure


class _ArrayPIL(torch.utils.data.Dataset):
    """Reference style: one PIL image per sample from a uint8 array, torchvision transforms."""

    def __init__(self, images_hwc, labels, transform, length):
        self.images, self.labels, self.transform, self.length = images_hwc, labels, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        from PIL import Image

        i = i % len(self.labels)
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _FilePIL(torch.utils.data.Dataset):
    """Reference style: decode the JPEG file for every sample, torchvision transforms."""

    def __init__(self, paths, labels, transform, length):
        self.paths, self.labels, self.transform, self.length = paths, labels, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        from PIL import Image

        i = i % len(self.labels)
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return self.transform(img), int(self.labels[i])


def _reference_transform(case: Case, cfg: Config):
    from torchvision import transforms as T

    if case.px == 32:
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    return T.Compose([T.RandomResizedCrop(case.px), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def run_reference(case: Case, cfg: Config, data: _Data, device: torch.device) -> float:
    """Images per second of the reference-style pipeline for `case`."""
    method = build_method(case, device, reference=True)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    length = 10**6
    if case.px == 32:
        images, labels = data.small(case.classes)
        ds = _ArrayPIL(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist(),
                       _reference_transform(case, cfg), length)
    else:
        ds = _FilePIL(data.large_files(), data.large_labels(case.classes).tolist(), _reference_transform(case, cfg),
                      length)
    loader = torch.utils.data.DataLoader(ds, batch_size=case.batch, shuffle=True, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    method.train()

    def step():
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, losses = method.loss(x, y)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    try:
        return measure(step, case.batch, device, max(cfg.warmup // 2, 1), min(cfg.min_steps, 3), cfg.seconds)
    finally:
        del it, loader   # stops the workers and the pin-memory thread before our step is captured
        gc.collect()
