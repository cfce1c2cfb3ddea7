"""What `refilled bench` measures and how: the rows (cases, full and small configurations),
the synthetic data they train on, the timed loop, FLOPs per image and the GPUs' bf16 peaks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F



# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; matched
# against torch.cuda.get_device_name() in this order (a name containing another first).
BF16_PEAK_TFLOPS = (
    ("GH200", 989.4),
    ("H200 NVL", 835.0),
    ("H200", 989.4),        # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),        # SXM5
    ("A100", 312.0),
    ("L40S", 362.05),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_bf16_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of `device` in TFLOP/s; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


@dataclass
class Case:
    method: str               # a catalog method (bench_methods(): the CE step first)
    student: str
    teacher: str | None
    px: int
    batch: int
    classes: int = 50


@dataclass
class Config:
    name: str
    batch: int
    batch_224: int
    px_224: int
    cache_px: int             # side of the decoded-once cache for the large images
    source_hw: tuple[int, int]  # size of the synthetic "photos" (JPEG) for the large images
    distinct_small: int       # distinct 32 px images
    distinct_large: int       # distinct JPEG files
    warmup: int
    min_steps: int
    seconds: float
    sync_every: int
    workers: int
    cases: list[Case] = field(default_factory=list)


def bench_methods() -> list[str]:
    """The catalog's bench rows, the CE step (every row's `vs CE` reference) first."""
    from refilled.methods import CATALOG
    from refilled.methods.catalog import TEACHER_METHOD

    return [TEACHER_METHOD] + [m for m, e in CATALOG.items() if e.bench and m != TEACHER_METHOD]


# The README's target rows, measured first (`--part targets`); `--part rest` is every other row.
TARGET_METHODS = ("student", "stage1", "refilled")


TARGET_STUDENTS = ("wrn-40-2", "wrn-16-1")


def is_target(case: Case) -> bool:
    return case.method in TARGET_METHODS and case.student in TARGET_STUDENTS


# Seconds that are not timed loops, for `--plan` (guesses for a H100/H200-class GPU, never
# measured there): starting the process (imports, CUDA context), per row (building the
# networks, the reference DataLoader's workers, warm-up, capture, FLOP count), the one-off
# synthetic JPEG files and their decoded cache for the 224 px rows, per concurrency round
# (N processes starting, capturing).
OVERHEAD_S = {"process": 15.0, "row_32": 4.0, "row_224": 8.0, "jpeg": 20.0, "round": 15.0}


def plan_seconds(cfg: Config, cuda: bool, reference: bool, eager: bool, rounds: int,
                 round_seconds: float) -> tuple[float, float]:
    """(timed seconds at least, estimated seconds in all) of a bench run: each row times our
    step, the reference (`reference`), our eager step (`eager`, CUDA graph rows) for at least
    cfg.seconds each, and the teacher forward for cfg.seconds / 2; each concurrency round
    trains for `round_seconds`."""
    timed = rounds * round_seconds
    for case in cfg.cases:
        timed += cfg.seconds * (1 + reference + (eager and cuda)) + (cfg.seconds / 2 if method_has_teacher(case) else 0)
    overhead = OVERHEAD_S["process"] + rounds * OVERHEAD_S["round"]
    overhead += sum(OVERHEAD_S["row_32" if c.px <= 64 else "row_224"] for c in cfg.cases)
    overhead += OVERHEAD_S["jpeg"] if any(c.px > 64 for c in cfg.cases) else 0
    return timed, timed + overhead


def _cases(student: str, teacher: str, px: int, batch: int, classes: int = 50, methods=None) -> list[Case]:
    from refilled.methods import get

    return [Case(m, student, teacher if get(m).teacher else None, px, batch, classes)
            for m in (methods or bench_methods())]


def full_config() -> Config:
    b, b224 = 128, 64
    cases = _cases("wrn-40-2", "wrn-40-2", 32, b) + _cases("wrn-16-1", "wrn-40-2", 32, b) \
        + _cases("mobilenet-1.0", "mobilenet-1.0", 224, b224, 100)
    return Config("full", b, b224, 224, 256, (375, 500), 10000, 512, warmup=5, min_steps=5, seconds=1.5,
                  sync_every=10, workers=min(8, os.cpu_count() or 1), cases=cases)


def small_config() -> Config:
    b = 16
    cases = _cases("wrn-16-1", "wrn-16-1", 32, b, 8) + _cases("mobilenet-0.25", "mobilenet-0.25", 64, b, 8,
                                                               bench_methods()[:2])
    return Config("small", b, b, 64, 72, (60, 80), 256, 48, warmup=1, min_steps=3, seconds=0.0, sync_every=1,
                  workers=1, cases=cases)


class _PrepareOn:
    """What `Method.prepare` reads of a run (stage 2's class centres): a few batches of the case."""

    def __init__(self, batches, device):
        self.train_plain, self.device = batches, device


def build_method(case: Case, device: torch.device, reference: bool = False, seed: int = 0):
    """The catalog's method of `case` at its default hyper-parameters; `reference` swaps in the
    method's `reference_loss` where it has one (stage 1's Python tuple loop)."""
    from refilled.methods import get
    from refilled.models import build_model

    entry = get(case.method)
    torch.manual_seed(seed)
    student = build_model(case.student, case.classes)
    teacher = build_model(case.teacher, case.classes).eval().requires_grad_(False) if entry.teacher else None
    method = entry.build(student, teacher, entry.resolve())
    if reference and hasattr(method, "reference_loss"):   # the authors' way of computing the same loss
        method.loss = method.reference_loss
    method.to(device)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(case.batch) % case.classes
    method.prepare(_PrepareOn([(torch.randn(case.batch, 3, case.px, case.px, generator=g).to(device), y.to(device))],
                              device))
    if device.type == "cuda" and not reference:
        method.to(memory_format=torch.channels_last)
    return method


class _Data:
    def __init__(self, cfg: Config, workdir: Path, seed: int = 0):
        self.cfg, self.workdir, self.seed = cfg, workdir, seed
        self._small: dict[int, tuple] = {}
        self._large = None
        self._cache = None        # the decoded-once uint8 cache of the large images

    def small(self, classes: int):
        if classes not in self._small:
            g = torch.Generator().manual_seed(self.seed)
            n = self.cfg.distinct_small
            images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
            labels = torch.randint(0, classes, (n,), generator=g)
            self._small[classes] = (images, labels)
        return self._small[classes]

    def large_files(self) -> list[Path]:
        """Synthetic photos as JPEG files (smooth colour fields plus noise)."""
        if self._large is None:
            from PIL import Image

            g = torch.Generator().manual_seed(self.seed + 1)
            h, w = self.cfg.source_hw
            folder = self.workdir / "jpeg"
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for i in range(self.cfg.distinct_large):
                low = torch.rand(1, 3, 6, 8, generator=g) * 255
                img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
                img = (img + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255).to(torch.uint8)
                path = folder / f"img_{i:05d}.jpg"
                Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(path, quality=90)
                paths.append(path)
            self._large = paths
        return self._large

    def large_labels(self, classes: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 2)
        return torch.randint(0, classes, (self.cfg.distinct_large,), generator=g)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, images_per_step: int, device: torch.device, warmup: int, min_steps: int, seconds: float,
            sync_every: int = 1) -> float:
    """Images per second of `fn` (one step), after `warmup` steps: at least `min_steps`
    steps and at least `seconds` of wall time, synchronising every `sync_every` steps."""
    for _ in range(warmup):
        fn()
    _sync(device)
    began = time.perf_counter()
    n = 0
    while True:
        fn()
        n += 1
        if n >= min_steps and n % max(sync_every, 1) == 0:
            _sync(device)
            if time.perf_counter() - began >= seconds:
                break
    return n * images_per_step / (time.perf_counter() - began)


def flops_per_image(method, x: torch.Tensor, y: torch.Tensor, amp: bool) -> float | None:
    """FLOPs of one training step (forward + backward) per image, by FlopCounterMode; None
    where it cannot count the step (its module hooks refuse `torch.autograd.grad` inside the
    loss: Jacobian matching's double backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    method.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
                _, losses = method.loss(x, y)
            sum(losses.values()).backward()
    except RuntimeError as exc:
        if "autograd.grad" not in str(exc):
            raise
        return None
    finally:
        for p in method.parameters():
            p.grad = None
    return counter.get_total_flops() / x.shape[0]


def method_has_teacher(case: Case) -> bool:
    from refilled.methods import get

    return get(case.method).teacher


def failure_note(exc: BaseException) -> str:
    """A failed row's note: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"FAILED: {type(exc).__name__}: {lines[0] if lines else ''}"
