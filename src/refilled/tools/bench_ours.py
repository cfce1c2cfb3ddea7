"""Our side of `refilled bench`: the batches, step and method the runs use, timed on the
same cases as the reference."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from refilled.data.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from refilled.data.cub200 import IMAGENET_MEAN, IMAGENET_STD
from refilled.tools.bench_cases import Case, Config, _Data, build_method, flops_per_image, measure, method_has_teacher


def _our_batches(case: Case, cfg: Config, data: _Data, device: torch.device):
    if case.px == 32:
        from refilled.data.batches import Batches, TaskSplit
        from refilled.data.datasets import ArraySplit, Dataset

        images, labels = data.small(case.classes)
        source = ArraySplit(images, labels)
        split = TaskSplit(source, torch.arange(len(labels)), labels, list(range(case.classes)))
        ds = Dataset("bench", [str(c) for c in range(case.classes)], source, source, CIFAR100_MEAN, CIFAR100_STD)
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
    from refilled.training.loop import nan_check_every

    cuda = device.type == "cuda"
    method = build_method(case, device)
    batches = _our_batches(case, cfg, data, device)
    stream = _endless(batches)
    out = {}
    x0, y0 = next(stream)
    if with_extras:
        out["flops"] = flops_per_image(method, x0.contiguous(memory_format=torch.channels_last) if cuda else x0, y0,
                                       amp=cuda)
    step = TrainStep(method, device, graph=graph, check_every=nan_check_every())
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
