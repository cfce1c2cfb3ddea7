"""`refilled bench`: our training step against a reference-style pipeline, in one process.

Reference style (what a straightforward implementation of the paper does):
- data: a `DataLoader` with worker processes running per-sample torchvision PIL transforms
  (32 px: RandomCrop(32, padding=4) + flip; 224 px: JPEG decode + RandomResizedCrop +
  flip), ToTensor, Normalize, pinned memory;
- fp32, NCHW, `torch.optim.SGD` (Nesterov) with its default implementation, eager,
  and ``loss.item()`` every step (the per-step logging such loops do);
- stage 1: semi-hard triplets mined, then grouped into tuples by a Python loop over the
  triplets and padded into index matrices (`reference_tuple_loss`, the structure of the
  authors' code; it computes the same loss as `refilled.losses.comparison_matching_loss`,
  see tests/test_bench.py).

Ours: the code the runs use. uint8 images on the device augmented batch-wise
(`refilled.data.batches.Batches`; 224 px: `refilled.data.augment.CachedImageBatches` on a
decoded-once cache), bf16 autocast, channels-last, fused SGD with a tensor lr, the whole
step captured in a CUDA graph (`refilled.training.step.TrainStep`), the dense stage-1 loss.

Rows: teacher training (CE), stage 1 and stage 2 for WRN-(40,2) and WRN-(16,1) students
(WRN-(40,2) teacher, 32 px) and MobileNet-1.0 at 224 px (MobileNet-1.0 teacher); on a
CPU-only machine a small configuration (batch 16, a few steps, WRN-(16,1) and
MobileNet-0.25 at 64 px). Columns: images per second of both, ratio ours / reference,
ours against our CE step of the same student (``vs_ce``), the teacher forward's share of
our step (stage rows), FLOPs per image of a training step (counted with
`torch.utils.flop_counter.FlopCounterMode`: convolutions and matrix products, forward and
backward), achieved TFLOP/s and their share of the GPU's dense bf16 peak ('n/a' where the
peak is unknown, e.g. on a CPU). ``--concurrent 1 2 4`` adds rows with the aggregate
images per second of N processes training at once on the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from refilled.io import write_csv

COLUMNS = ["method", "student", "teacher", "px", "batch", "jobs", "ref_img_s", "ours_img_s", "ratio",
           "ours_eager_img_s", "vs_ce", "vs_one_job", "teacher_share", "gflop_per_img", "tflops", "peak_share",
           "device", "notes"]

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

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


# --------------------------------------------------------------------------------------
# Synthetic data, held once per bench run
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


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


def _reference_transform(case: Case, cfg: Config):
    from torchvision import transforms as T

    if case.px == 32:
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(CIFAR_MEAN, CIFAR_STD)])
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


def _our_batches(case: Case, cfg: Config, data: _Data, device: torch.device):
    if case.px == 32:
        from refilled.data.batches import Batches, TaskSplit
        from refilled.data.datasets import ArraySplit, Dataset

        images, labels = data.small(case.classes)
        source = ArraySplit(images, labels)
        split = TaskSplit(source, torch.arange(len(labels)), labels, list(range(case.classes)))
        ds = Dataset("bench", [str(c) for c in range(case.classes)], source, source, CIFAR_MEAN, CIFAR_STD)
        return Batches(split, ds, case.batch, True, device, seed=0)
    from refilled.data.augment import CachedImageBatches, decode_fixed

    if data._cache is None:
        data._cache = decode_fixed(data.large_files(), cfg.cache_px, num_workers=min(cfg.workers, 8))
    images, heights, widths = data._cache
    return CachedImageBatches(images, heights, widths, data.large_labels(case.classes), IMAGENET_MEAN, IMAGENET_STD,
                              case.batch, True, device, seed=0, out=case.px, resize=round(case.px * 256 / 224))


def _endless(batches):
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def run_ours(case: Case, cfg: Config, data: _Data, device: torch.device, graph: str = "auto",
             with_extras: bool = True) -> dict:
    """Images per second of our pipeline; with_extras adds FLOPs/image and the teacher
    forward's share of the step."""
    from refilled.training.step import TrainStep
    from refilled.training.loop import NAN_CHECK_EVERY

    cuda = device.type == "cuda"
    method = build_method(case, device)
    batches = _our_batches(case, cfg, data, device)
    stream = _endless(batches)
    out = {}
    x0, y0 = next(stream)
    if with_extras:
        out["flops"] = flops_per_image(method, x0.contiguous(memory_format=torch.channels_last) if cuda else x0, y0,
                                       amp=cuda)
    step = TrainStep(method, device, graph=graph, check_every=NAN_CHECK_EVERY)
    step.begin_epoch(0, 0.1)
    method.train()

    def one():
        x, y = next(stream)
        step.step(x, y)

    out["img_s"] = measure(one, case.batch, device, cfg.warmup, cfg.min_steps, cfg.seconds, cfg.sync_every)
    step.check_finite()
    out["steps"] = step.record()
    if with_extras and method_has_teacher(case):
        out["teacher_s"] = _teacher_forward_seconds(method.teacher, x0, device, cfg)
    return out


def method_has_teacher(case: Case) -> bool:
    from refilled.methods import get

    return get(case.method).teacher


def _teacher_forward_seconds(teacher, x, device: torch.device, cfg: Config) -> float:
    """Seconds per batch of the frozen teacher's forward as our step runs it (bf16,
    channels-last, inside the CUDA graph on CUDA: here captured on its own)."""
    cuda = device.type == "cuda"
    sx = x.contiguous(memory_format=torch.channels_last) if cuda else x.clone()

    def forward():
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda,
                                             cache_enabled=False):
            teacher(sx)

    from refilled.training.step import capture_disabled

    fn = forward
    if cuda and capture_disabled() is None:   # after a failed capture, no other in this process
        s = torch.cuda.Stream(device=device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(3):
                forward()
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s, capture_error_mode="thread_local"):
            forward()
        fn = graph.replay
    rate = measure(fn, 1, device, cfg.warmup, cfg.min_steps, cfg.seconds / 2, cfg.sync_every)
    return 1.0 / rate


def _fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def bench_rows(cfg: Config, device: torch.device, reference: bool = True, eager: bool | None = None,
               workdir: Path | None = None, log=print, on_row=None, earlier: list[dict] | None = None) -> list[dict]:
    """One row per case of `cfg`, each passed to `on_row(row)` the moment it is measured (a
    time limit keeps the finished rows). A row that fails (an exception, a non-finite loss)
    says so in its notes and the next row runs. `earlier`: rows measured before (another
    call), where `vs_ce` finds its CE row too."""
    eager = device.type == "cuda" if eager is None else eager
    if device.type == "cuda":   # for both pipelines, so that neither row depends on which ran first
        torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    known = list(earlier or [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="refilled-bench-") as tmp:
        data = _Data(cfg, Path(workdir or tmp))
        for case in cfg.cases:
            row = {"method": case.method, "student": case.student, "teacher": case.teacher or "", "px": case.px,
                   "batch": case.batch, "jobs": 1, "device": dev_name}
            try:
                _measure_row(row, case, cfg, data, device, reference, eager, known)
            except Exception as exc:   # this row's failure, reported in it; the next row runs
                row["notes"] = failure_note(exc)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            known.append(row)
            log(f"  {case.method:8s} {case.student:15s} {case.px:4d}px: ours {row.get('ours_img_s') or '-'} img/s, "
                f"reference {row.get('ref_img_s') or '-'} img/s{'  ' + row['notes'] if row['notes'] else ''}")
            if on_row:
                on_row(row)
    return rows


def failure_note(exc: BaseException) -> str:
    """A failed row's note: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"FAILED: {type(exc).__name__}: {lines[0] if lines else ''}"


def _measure_row(row: dict, case: Case, cfg: Config, data, device: torch.device, reference: bool, eager: bool,
                 known: list[dict]) -> None:
    from refilled.training.step import NonFiniteLoss

    notes = []
    ref = None
    if reference:
        try:
            ref = run_reference(case, cfg, data, device)
        except ImportError as exc:   # torchvision missing: no PIL reference
            notes.append(f"no reference ({exc.name} missing)")
    try:
        ours = run_ours(case, cfg, data, device)
    except NonFiniteLoss as exc:
        raise FloatingPointError(f"non-finite loss ({exc})") from None
    notes += _step_notes(ours["steps"], device)
    row["ref_img_s"] = round(ref, 1) if ref else ""
    row["ours_img_s"] = round(ours["img_s"], 1)
    row["ratio"] = round(row["ours_img_s"] / row["ref_img_s"], 3) if ref else ""
    if eager and ours["steps"]["graph_steps"]:
        row["ours_eager_img_s"] = round(run_ours(case, cfg, data, device, graph="off", with_extras=False)["img_s"], 1)
    if "teacher_s" in ours:
        row["teacher_share"] = round(ours["teacher_s"] * ours["img_s"] / case.batch, 3)
    peak = peak_bf16_tflops(device)
    if ours["flops"] is None:
        notes.append("FLOPs not counted (FlopCounterMode cannot trace autograd.grad)")
        row["gflop_per_img"] = row["tflops"] = row["peak_share"] = "n/a"
    else:
        gflop = ours["flops"] / 1e9
        row["gflop_per_img"] = round(gflop, 4)
        tflops = gflop * ours["img_s"] / 1e3
        row["tflops"] = round(tflops, 3)
        row["peak_share"] = round(tflops / peak, 4) if peak else "n/a"
    ce_method = bench_methods()[0]
    ce = [r for r in known if r["method"] == ce_method and r["student"] == case.student
          and str(r["px"]) == str(case.px) and str(r["jobs"]) == "1" and r.get("ours_img_s") not in (None, "")]
    if ce and case.method != ce_method:   # ours against our CE step of the same student at the same size
        row["vs_ce"] = round(row["ours_img_s"] / float(ce[-1]["ours_img_s"]), 3)
    row["notes"] = "; ".join(notes)


def _step_notes(record: dict, device: torch.device) -> list[str]:
    """What a row must say about how its timed steps ran, where it is not the plain graph."""
    if record["requested"] == "off" or record["mode"] == "graph":
        return []
    if record["capture_failures"]:
        return [f"graph capture failed: eager ({record.get('capture_disabled', '')})"]
    if record.get("capture_disabled"):
        return ["eager: graph capture is off in this process after an earlier failure"]
    return [f"steps ran as {record['mode']} ({record['fallbacks']} eager fallbacks)"]


# --------------------------------------------------------------------------------------
# Concurrent jobs on one device
# --------------------------------------------------------------------------------------


def _child(spec: dict) -> int:
    """One of N concurrent jobs: warm up, say ready, wait for 'go', train for `seconds`."""
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    cfg = small_config() if spec["config"] == "small" else full_config()
    cfg.cases = [case]
    ready, go = Path(spec["ready"]), Path(spec["go"])
    from refilled.training.step import TrainStep

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="refilled-bench-child-") as tmp:
        data = _Data(cfg, Path(tmp))
        method = build_method(case, device)
        stream = _endless(_our_batches(case, cfg, data, device))
        step = TrainStep(method, device)
        step.begin_epoch(0, 0.1)
        method.train()
        for _ in range(cfg.warmup + 1):
            step.step(*next(stream))
        _sync(device)
        ready.write_text("ready")
        deadline = time.time() + 600
        while not go.exists():
            if time.time() > deadline:
                return 3
            time.sleep(0.005)
        began = time.perf_counter()
        n = 0
        while True:
            step.step(*next(stream))
            n += 1
            if n % cfg.sync_every == 0:
                _sync(device)
                if time.perf_counter() - began >= spec["seconds"]:
                    break
        elapsed = time.perf_counter() - began
    print(json.dumps({"images": n * case.batch, "seconds": elapsed, "mode": step.record()["mode"]}), flush=True)
    return 0


def concurrent_rows(cfg: Config, device: torch.device, jobs_list: list[int], case: Case, seconds: float,
                    log=print, on_row=None, one_job: tuple[float, str] | None = None) -> list[dict]:
    """Aggregate images per second of N processes each running our step of `case`, one row
    per N (ascending), each passed to `on_row(row)` when measured. `vs_one_job` compares
    with the N = 1 round, or where there is none with `one_job` (img/s, what it is)."""
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    if device.type == "cuda":
        torch.cuda.empty_cache()    # leave the GPU's memory to the children
    for jobs in sorted(jobs_list):
        row = {"method": f"{case.method} (concurrent)", "student": case.student, "teacher": case.teacher or "",
               "px": case.px, "batch": case.batch, "jobs": jobs, "device": dev_name, "ref_img_s": "", "ratio": "",
               "peak_share": ""}
        try:
            results, errors = _concurrent_round(cfg, device, jobs, case, seconds, env)
        except Exception as exc:   # this round's failure, reported in its row; the next round runs
            results, errors = [], [failure_note(exc)]
        modes = sorted({r.get("mode", "?") for r in results} - {"graph"}) if device.type == "cuda" else []
        total = sum(r["images"] / r["seconds"] for r in results)
        row["ours_img_s"] = round(total, 1) if results else ""
        if len(results) < jobs and not errors:
            errors.append(f"{jobs - len(results)} of {jobs} jobs reported nothing")
        row["notes"] = "; ".join(errors + [f"steps ran as {m}" for m in modes])
        if jobs == 1 and results and not errors:
            one_job = (row["ours_img_s"], "")
        if one_job and results and one_job[0]:
            row["vs_one_job"] = round(row["ours_img_s"] / one_job[0], 3)
            if one_job[1]:
                row["notes"] = "; ".join(filter(None, [row["notes"], f"vs 1 job: against {one_job[1]}"]))
        rows.append(row)
        notes = f"  {row['notes']}" if row["notes"] else ""
        log(f"  concurrent x{jobs}: {row['ours_img_s'] or '-'} img/s in total{notes}")
        if on_row:
            on_row(row)
    return rows


def _concurrent_round(cfg: Config, device: torch.device, jobs: int, case: Case, seconds: float, env: dict):
    """N child processes of `case` started together; (their reports, their errors)."""
    with tempfile.TemporaryDirectory(prefix="refilled-conc-") as tmp:
        go = Path(tmp) / "go"
        procs, logs = [], []
        for j in range(jobs):
            spec = {"device": str(device), "case": asdict(case), "config": cfg.name, "seconds": seconds,
                    "ready": str(Path(tmp) / f"ready{j}"), "go": str(go)}
            # files, not pipes: a child must never block on output nobody reads while we wait
            logs.append((open(Path(tmp) / f"out{j}", "w+"), open(Path(tmp) / f"err{j}", "w+")))
            procs.append(subprocess.Popen([sys.executable, "-m", "refilled.tools.bench", "--child", json.dumps(spec)],
                                          env=env, stdout=logs[-1][0], stderr=logs[-1][1], text=True))
        deadline = time.time() + 600
        while not all((Path(tmp) / f"ready{j}").exists() for j in range(jobs)):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.01)
        go.write_text("go")
        results, errors = [], []
        for p, (out_f, err_f) in zip(procs, logs):
            p.wait(timeout=900)
            with out_f, err_f:
                out_f.seek(0)
                err_f.seek(0)
                out, err = out_f.read(), err_f.read()
            if p.returncode == 0:
                results.append(json.loads(out.strip().splitlines()[-1]))
            else:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
    return results, errors


# --------------------------------------------------------------------------------------
# Table, CSV, command line
# --------------------------------------------------------------------------------------

TABLE = [("method", "method", 14), ("student", "student", 15), ("teacher", "teacher", 15), ("px", "px", 4),
         ("batch", "batch", 5), ("jobs", "jobs", 4), ("ref_img_s", "ref img/s", 10), ("ours_img_s", "ours img/s", 10),
         ("ratio", "ours/ref", 8), ("ours_eager_img_s", "eager img/s", 11), ("vs_ce", "vs CE", 6),
         ("vs_one_job", "vs 1 job", 8), ("teacher_share", "teacher", 7), ("gflop_per_img", "GFLOP/img", 9),
         ("tflops", "TFLOP/s", 8), ("peak_share", "bf16 peak", 9)]


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(title.rjust(w) for _, title, w in TABLE)]
    for r in rows:
        cells = []
        for key, _, w in TABLE:
            v = r.get(key, "")
            if key == "peak_share" and isinstance(v, float):
                v = f"{100 * v:.1f}%"
            cells.append(_fmt(v).rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def run_bench(args) -> list[dict]:
    from refilled.training.loop import resolve_device

    device = resolve_device(args.device)
    config = args.config if args.config != "auto" else ("full" if device.type == "cuda" else "small")
    cfg = full_config() if config == "full" else small_config()
    if args.seconds is not None:
        cfg.seconds = args.seconds
    if args.steps is not None:
        cfg.min_steps = args.steps
    if args.methods:
        cfg.cases = [c for c in cfg.cases if c.method in args.methods]
    if args.archs:
        cfg.cases = [c for c in cfg.cases if c.student in args.archs]
    if args.part != "all":
        cfg.cases = [c for c in cfg.cases if is_target(c) == (args.part == "targets")]
    if args.workers is not None:
        cfg.workers = args.workers
    eager = None if args.eager is None else args.eager == "yes"
    jobs_list = list(args.concurrent or [])
    conc_seconds = args.concurrent_seconds
    if conc_seconds is None:
        conc_seconds = 3.0 if config == "full" else 0.5
    earlier = _read_rows(args.out) if args.append and args.out and Path(args.out).exists() else []
    measured = {_row_key(r) for r in earlier if r.get("ours_img_s") not in (None, "")}
    earlier = [r for r in earlier if _row_key(r) in measured]   # a failed row is measured again, not kept twice
    cfg.cases = [c for c in cfg.cases if (c.method, c.student, str(c.px), "1") not in measured]
    base = Case(bench_methods()[0], args.concurrent_arch or "wrn-16-1", None, 32, cfg.batch,
                50 if config == "full" else 8)
    jobs_list = [j for j in jobs_list if (f"{base.method} (concurrent)", base.student, "32", str(j)) not in measured]
    if args.plan:
        cuda = device.type == "cuda"
        timed, estimate = plan_seconds(cfg, cuda, not args.no_reference, cuda if eager is None else eager,
                                       len(jobs_list), conc_seconds)
        print(f"plan: {len(cfg.cases)} rows and {len(jobs_list)} concurrency rounds; timed {timed:.1f} s at least, "
              f"estimated {estimate:.0f} s in all (a guess, not measured)")
        return []
    print(f"refilled bench: {config} configuration on {device} (torch {torch.__version__}); "
          f"reference = per-sample PIL DataLoader ({cfg.workers} workers), fp32, eager"
          "; a method's reference_loss where it has one (stage 1: the Python tuple loop)", flush=True)
    rows = list(earlier)

    def save(row):   # every row the moment it is measured: a time limit keeps the finished ones
        for c in COLUMNS:
            row.setdefault(c, "")
        rows.append(row)
        if args.out:
            write_csv(args.out, [{c: r.get(c, "") for c in COLUMNS} for r in rows], COLUMNS)

    log = lambda s: print(s, flush=True)
    bench_rows(cfg, device, reference=not args.no_reference, eager=eager, log=log, on_row=save, earlier=earlier)
    if jobs_list:
        in_process = [r for r in rows if r["method"] == base.method and r["student"] == base.student
                      and str(r["px"]) == "32" and str(r["jobs"]) == "1" and r.get("ours_img_s") not in (None, "")]
        one_job = (float(in_process[-1]["ours_img_s"]), "the in-process row") if in_process else None
        one_conc = [r for r in rows if r["method"] == f"{base.method} (concurrent)" and str(r["jobs"]) == "1"
                    and r.get("ours_img_s") not in (None, "")]
        if one_conc:
            one_job = (float(one_conc[-1]["ours_img_s"]), "")
        concurrent_rows(cfg, device, jobs_list, base, conc_seconds, log=log, on_row=save, one_job=one_job)
    print(format_table(rows))
    if args.out:
        print(f"wrote {args.out}")
    return rows


def _row_key(row: dict) -> tuple[str, str, str, str]:
    return row["method"], row["student"], str(row["px"]), str(row["jobs"])


def _read_rows(path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0]) != COLUMNS:
        print(f"refilled bench: {path} has other columns than this version writes; choose another --out "
              "or drop --append", file=sys.stderr)
        raise SystemExit(2)
    return rows


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--config", choices=("auto", "full", "small"), default="auto",
                   help="full: batch 128 (64 at 224 px), WRN-(40,2), WRN-(16,1), MobileNet-1.0 at 224 px; small: "
                        "batch 16, a few steps, WRN-(16,1) and MobileNet-0.25 at 64 px (auto: full on CUDA)")
    from refilled.methods import CATALOG

    p.add_argument("--methods", nargs="+", choices=list(CATALOG), help="only the rows of these catalog methods")
    p.add_argument("--archs", nargs="+", help="only these students")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (at least)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (at least)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the reference pipeline")
    p.add_argument("--no-reference", action="store_true", help="measure only our pipeline")
    p.add_argument("--eager", choices=("yes", "no"), default=None,
                   help="also time our step without the CUDA graph (default: yes on CUDA)")
    p.add_argument("--concurrent", type=int, nargs="+", default=None, metavar="N",
                   help="add aggregate img/s rows for N concurrent jobs on the device, e.g. 1 2 4")
    p.add_argument("--concurrent-arch", default=None, help="student of the concurrent jobs (default wrn-16-1)")
    p.add_argument("--concurrent-seconds", type=float, default=None, help="timed seconds of each concurrent job")
    p.add_argument("--out", type=Path, default=Path("bench.csv"), help="CSV path (default bench.csv)")
    p.add_argument("--part", choices=("all", "targets", "rest"), default="all",
                   help="targets: only the README's target rows (" + ", ".join(TARGET_METHODS) + " for "
                        + " and ".join(TARGET_STUDENTS) + "); rest: every other row")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out and measure only those not there yet")
    p.add_argument("--plan", action="store_true",
                   help="print the timed seconds (at least) and estimated seconds of this selection; measure nothing")


def cmd_bench(args) -> int:
    """0, or 1 where a row failed (its notes say how; --append drops earlier failed rows)."""
    rows = run_bench(args)
    return 1 if any(r.get("ours_img_s") in (None, "") for r in rows) else 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `refilled bench` on the CLI's subparsers (the caller wires it in)."""
    p = subparsers.add_parser(
        "bench", help="images/s of our training step against a reference-style pipeline",
        description="Teacher training, stage 1 and stage 2: our pipeline (uint8 data on the device, batched "
                    "augmentation, bf16, channels-last, fused SGD, CUDA graph) against a reference-style one "
                    "(per-sample PIL DataLoader with workers, fp32, eager; stage 1 as a Python tuple loop), in one "
                    "process. Prints a table (img/s, ratio, share of the GPU's bf16 peak) and writes it as CSV. "
                    "On a CPU-only machine it runs a small configuration.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog="refilled bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
