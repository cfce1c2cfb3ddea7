"""Batched image augmentation for 224 px training (CUB) on uint8 images held on the device.

The CPU reference path decodes every image with PIL for every sample and applies
``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` (training) or ``Resize(256)`` +
``CenterCrop(224)`` (test). Here every image is decoded once, resized (anisotropically)
to a fixed ``size x size`` uint8 array, and kept on the device with its original
height and width. A batch is then augmented in one go:

- crop boxes are drawn exactly as ``torchvision.transforms.RandomResizedCrop.get_params``
  draws them (10 attempts of scale ~ U(0.08, 1) of the area and log-aspect ~
  U(log 3/4, log 4/3), first attempt that fits, else the ratio-clamped centre crop),
  vectorised over the batch, in the *original* image's pixel coordinates, from a CPU
  generator (as `refilled.data.batches.random_crop_flip` does);
- the box is mapped into the cached image (x scaled by size / W, y by size / H), so the
  crop shows the same part of the image as on the CPU path;
- one sampling grid, built elementwise (`crop_grid`: no matrix product, so TF32 cannot
  round it), and one ``grid_sample`` (bilinear, align_corners=False) cut and resize all
  boxes to ``out x out``, mirrored where the flip (p = 0.5) says so.

Differences to the PIL path, by design: the resampling starts from the ``size``-pixel
cache rather than the full-resolution file (with size 256 and out 224 a crop is shrunk by
at most 256/224, so bilinear without antialiasing aliases little), and it is bilinear on
float values of the cache, not PIL's antialiased bilinear on the file.

`CachedImageBatches` is the `Batches`-like iterable over such a cache (same epoch
generator convention, same drop-last rule); `decode_fixed` builds the cache from image
files (optionally through DataLoader workers) and `load_or_decode` stores it on disk,
one file per source split (CUB train: 5,994 images, 1.2 GB at 256 px), read back
memory-mapped. `refilled.data.batches.Batches` takes this path for files on CUDA.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from refilled.data.streams import epoch_generator
from refilled.io import CheckpointError

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator,
                              scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
                              attempts: int = 10) -> torch.Tensor:
    """Boxes ``[B, 4]`` = (top, left, height, width) in pixels of each original image, drawn
    as ``RandomResizedCrop.get_params`` draws them (on the CPU, from `generator`)."""
    h_img = heights.to(torch.float64).cpu()
    w_img = widths.to(torch.float64).cpu()
    b = len(h_img)
    area = (h_img * w_img)[:, None]
    target = area * torch.empty(b, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b, attempts, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                   generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])
    u_top = torch.rand(b, attempts, dtype=torch.float64, generator=generator)
    u_left = torch.rand(b, attempts, dtype=torch.float64, generator=generator)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(b, dtype=torch.long))
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)
    h_ok, w_ok = pick(h), pick(w)
    top = torch.floor(pick(u_top) * (h_img - h_ok + 1))
    left = torch.floor(pick(u_left) * (w_img - w_ok + 1))
    # fallback (no attempt fitted): the centre crop with the aspect clamped to `ratio`
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio < ratio[0], w_img, torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img))
    fh = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    ftop, fleft = torch.div(h_img - fh, 2, rounding_mode="floor"), torch.div(w_img - fw, 2, rounding_mode="floor")
    found = ok.any(1)
    return torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                        torch.where(found, h_ok, fh), torch.where(found, w_ok, fw)], 1)


def center_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, resize: int = 256, out: int = 224) -> torch.Tensor:
    """``Resize(resize)`` (short side) then ``CenterCrop(out)`` as a box in original pixels."""
    h = heights.to(torch.float64).cpu()
    w = widths.to(torch.float64).cpu()
    side = out * torch.minimum(h, w) / resize
    return torch.stack([(h - side) / 2, (w - side) / 2, side, side], 1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                out: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Cut `boxes` (original-pixel (top, left, h, w) of images of size `heights` x `widths`)
    from the cached ``[B, C, S, S]`` `images` and resize each to ``out x out`` (bilinear,
    align_corners=False), mirrored where `flip`. Returns float32 in the images' value range."""
    b, _, s_h, s_w = images.shape
    dev = images.device
    flip = torch.zeros(b, dtype=torch.bool) if flip is None else flip
    # one host-to-device copy, from pinned memory and asynchronous on CUDA (no stream sync)
    params = _to_device(torch.cat([boxes.cpu().to(torch.float32), heights.cpu().to(torch.float32)[:, None],
                                   widths.cpu().to(torch.float32)[:, None], flip.cpu().to(torch.float32)[:, None]], 1),
                        dev)
    sy, sx = s_h / params[:, 4], s_w / params[:, 5]
    top, left = params[:, 0] * sy, params[:, 1] * sx      # box in cache pixels
    bh, bw = params[:, 2] * sy, params[:, 3] * sx
    grid = crop_grid(top, left, bh, bw, params[:, 6], s_h, s_w, out)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_grid(top: torch.Tensor, left: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor, flip: torch.Tensor,
              s_h: int, s_w: int, out: int) -> torch.Tensor:
    """The ``[B, out, out, 2]`` sampling grid (x, y in [-1, 1], align_corners=False) of the
    boxes (top, left, bh, bw in cache pixels of an ``s_h x s_w`` image), mirrored where
    ``flip`` is 1: what ``F.affine_grid`` gives for the boxes' scale-and-shift matrices, built
    elementwise. affine_grid is a batched matmul on CUDA, which TF32 (forced by
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in some images) rounds to hundredths of a pixel."""
    centres = (torch.arange(out, device=top.device, dtype=torch.float32) * 2 + 1) / out - 1   # output pixel centres
    scale_x = (bw / s_w * (1.0 - 2.0 * flip))[:, None, None]
    shift_x = ((2 * left + bw) / s_w - 1)[:, None, None]
    scale_y, shift_y = (bh / s_h)[:, None, None], ((2 * top + bh) / s_h - 1)[:, None, None]
    gx = (scale_x * centres[None, None, :] + shift_x).expand(-1, out, out)
    gy = (scale_y * centres[None, :, None] + shift_y).expand(-1, out, out)
    return torch.stack([gx, gy], -1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor to `device`; on CUDA through pinned memory without a stream sync (a plain
    `.to("cuda")` of pageable memory synchronises the stream and stalls the pipeline)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_resized_crop_flip(images: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, out: int,
                             generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(out) + RandomHorizontalFlip() of a batch of cached images."""
    boxes = random_resized_crop_boxes(heights, widths, generator)
    flip = torch.rand(len(boxes), generator=generator) < 0.5
    return crop_resize(images, boxes, heights, widths, out, flip)


class CachedImageBatches:
    """Iterable over (normalised float images ``[B, 3, out, out]``, labels) on `device`,
    from a uint8 cache; the `Batches` conventions: `set_epoch`, one generator per
    (seed, epoch), training drops the last partial batch."""

    def __init__(self, images: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, labels: torch.Tensor,
                 mean, std, batch_size: int, train: bool, device: torch.device, seed: int = 0, out: int = 224,
                 resize: int = 256):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.heights, self.widths = heights.cpu(), widths.cpu()
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.seed, self.out, self.resize = batch_size, train, seed, out, resize
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train and n >= self.batch_size else -(-n // self.batch_size)

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            idx_dev = _to_device(idx, self.device)
            h, w = self.heights[idx], self.widths[idx]
            if self.train:
                x = random_resized_crop_flip(self.images[idx_dev], h, w, self.out, g)
            else:
                x = crop_resize(self.images[idx_dev], center_crop_boxes(h, w, self.resize, self.out), h, w, self.out)
            yield (x - self.mean) / self.std, self.labels[idx_dev]


class _DecodeFixed(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        from refilled.data.cub200 import decode_image

        im = decode_image(self.paths[i])          # names the file if it does not decode
        w, h = im.size
        im = im.resize((self.size, self.size), Image.BILINEAR)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return data.view(self.size, self.size, 3).permute(2, 0, 1).clone(), h, w


def decode_fixed(paths, size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode every image once: (uint8 ``[N, 3, size, size]``, heights, widths) of the originals."""
    loader = torch.utils.data.DataLoader(_DecodeFixed(paths, size), batch_size=64, num_workers=num_workers)
    images, heights, widths = [], [], []
    for x, h, w in loader:
        images.append(x)
        heights.append(torch.as_tensor(h))
        widths.append(torch.as_tensor(w))
    if not images:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(images), torch.cat(heights).long(), torch.cat(widths).long()


def default_cache_dir() -> Path:
    """Where decoded-image caches live: ``$REFILLED_CACHE_DIR``, else ``$XDG_CACHE_HOME/refilled``,
    else ``~/.cache/refilled`` (outside the data folder, which may be read-only or DVC-tracked)."""
    if os.environ.get("REFILLED_CACHE_DIR"):
        return Path(os.environ["REFILLED_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refilled"


def cache_key(paths, size: int) -> str:
    """Changes when a path, a file's size or modification time, or the cache size changes."""
    h = hashlib.sha256(f"v1 {size}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_or_decode(paths, size: int = 256, cache_dir: str | Path | None = None, num_workers: int = 0):
    """`decode_fixed`, stored under `cache_dir` (keyed by `cache_key`) and memory-mapped when
    read back, so that taking a few rows reads only those. Concurrent jobs wanting the same
    cache wait on a lock while the first one decodes, then read its file."""
    if cache_dir is None:
        return decode_fixed(paths, size, num_workers)
    from refilled.io import load_tensors, save_tensors

    paths = list(paths)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"images_{size}px_{cache_key(paths, size)}.pt"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            images, heights, widths = decode_fixed(paths, size, num_workers)
            save_tensors(path, {"images": images, "heights": heights, "widths": widths})
            return images, heights, widths
    state = load_tensors(path, mmap=True)
    if len(state["images"]) != len(paths):
        raise CheckpointError(f"{path}: holds {len(state['images'])} images, expected {len(paths)}; delete it")
    return state["images"], state["heights"], state["widths"]


def cached_file_batches(split, dataset, batch_size: int, train: bool, device, seed: int = 0, size: int = 256,
                        out: int = 224, cache_dir: str | Path | None = None, num_workers: int = 0) -> CachedImageBatches:
    """`CachedImageBatches` for a `refilled.data.batches.TaskSplit` over a `FileSplit` (CUB).

    With `cache_dir`, the whole source split (all of CUB's training or test images) is
    decoded once at ``size x size`` and stored there, and every task takes its rows
    from that one file; without it, only the task's images are decoded, in memory."""
    if cache_dir is None:
        paths = [split.source.paths[i] for i in split.indices.tolist()]
        cache, heights, widths = decode_fixed(paths, size, num_workers)
    else:
        whole = load_or_decode(split.source.paths, size, cache_dir, num_workers)
        cache, heights, widths = (t[split.indices] for t in whole)
    return CachedImageBatches(cache, heights, widths, split.labels, dataset.mean, dataset.std, batch_size, train,
                              device, seed, out=out, resize=round(out * 256 / 224))
