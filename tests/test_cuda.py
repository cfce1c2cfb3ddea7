"""CUDA checks: the graph-captured step against the eager step for every case of the CPU
step tests (every catalog method; tests/methods_cases.py), a WRN with dropout 0.3 and a
joint head; training, resume and a non-finite loss under capture; the GPU augmentation.

Skipped without a CUDA device. Runs under pytest, or without it (the GPU image may have
only PyTorch): ``PYTHONPATH=src python tests/test_cuda.py`` runs every ``test_*`` function
here and exits non-zero on a failure (scripts/gpu_check.sh does that).

Tolerances (stated per test):
- fp32 step (autocast off, TF32 off): loss terms relative 1e-5; gradients relative L2
  error 1e-4 (cuDNN may pick different algorithms for eager and graph, and some backward
  kernels use atomics);
- bf16 step (the training default): loss terms relative 1e-2; gradients relative L2 error
  2e-2; weights and buffers after a few steps (graph against eager, resumed against
  uninterrupted, with a batch of another shape) relative L2 error 1e-2 plus 1e-3 RMS per
  element for tensors near zero;
- augmentation: CUDA and CPU give the same crops for the same seed (exactly for the
  32 px crop, within 1e-3 of the 0..255 range for the 224 px crop); flips, counted in the
  output images: 4000 images, |flips - 2000| < 4 binomial standard deviations (126).
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import pytest
except ImportError:   # the standalone runner below needs no pytest
    pytest = None

CUDA = torch.cuda.is_available()
if pytest is not None:
    pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

DEV = torch.device("cuda") if CUDA else None
B, C = 32, 4


def _batches(n=4, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.arange(C).repeat_interleave(B // C)[torch.randperm(B, generator=g)]
        x = torch.randn(B, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1) * 0.3
        out.append((x.to(device or DEV), y.to(device or DEV)))
    return out


sys.path.insert(0, str(Path(__file__).parent))    # the standalone runner: the helpers beside this file
from methods_cases import CASE_IDS, CASES as METHOD_CASES, build_case   # noqa: E402

# Every case of the CPU step tests (each catalog method, and the variants whose code paths
# differ), plus what only a real graph can get wrong: dropout (the paper profile's 0.3; its
# masks come from the RNG under capture) and a joint head (a second head fed by a forward hook).
DROPOUT, JOINT = "student-wrn-dropout-0.3", "refilled-joint-head"
METHODS = CASE_IDS + [DROPOUT, JOINT]


def _method(name, seed=0):
    from refilled.methods.joint import JointHead
    from refilled.methods.student import Student
    from refilled.models import build_model

    if name == DROPOUT:
        torch.manual_seed(seed)
        m = Student(build_model("wrn-16-1", C, dropout=0.3))
    else:
        inner = build_case("refilled" if name == JOINT else name, student_arch="wrn-16-1", teacher_arch="wrn-16-2",
                           classes=C, teacher_classes=6, prepare_batches=_batches(2, seed=99), device=DEV, seed=seed)
        # the joint head over two of the teacher's classes the student does not have
        m = JointHead(inner, inner.teacher, [4, 5], weight=1.0, T=2.0, seed=seed) if name == JOINT else inner
    return m.to(DEV).to(memory_format=torch.channels_last)


def catalog_methods_covered() -> set[str]:
    """The catalog methods that METHODS runs (the CPU suite checks that this is all of them)."""
    by_id = {case_id: method for case_id, method, _ in METHOD_CASES}
    return {by_id[name] for name in METHODS if name in by_id}


def _each_method(fn):
    """One test per name of METHODS: parametrised under pytest; the standalone runner loops."""
    fn.each_method = True
    return pytest.mark.parametrize("name", METHODS)(fn) if pytest is not None else fn


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _assert_states_close(name, ref: dict, other: dict, rel=1e-2, floor=1e-3):
    """Floating tensors within `rel` relative L2, or within `floor` per element (RMS) for
    tensors near zero (biases and BN shifts start at 0, where relative error means nothing)."""
    for k, a in ref.items():
        b = other[k]
        if not a.is_floating_point():
            continue
        diff, scale = (b.float() - a.float()).norm(), a.float().norm()
        assert diff <= rel * scale + floor * math.sqrt(a.numel()), \
            f"{name}: {k} differs by {diff:.2e} (relative {_rel(b, a):.2e})"


def _compare_one_step(name, amp, loss_tol, grad_tol):
    from refilled.training.step import TrainStep

    data = _batches(1)
    eager_m = _method(name)
    graph_m = copy.deepcopy(eager_m)
    eager = TrainStep(eager_m, DEV, graph="off", amp=amp)
    graph = TrainStep(graph_m, DEV, graph="on", amp=amp)
    for step, m in ((eager, eager_m), (graph, graph_m)):
        m.train()
        step.begin_epoch(0, 0.1)
        torch.manual_seed(1234)      # the same dropout masks (and any other draw) for both
        step.step(*data[0])
    rec = graph.record()
    assert rec["mode"] == "graph" and rec["captures"] == 1, f"{name}: the step was not captured: {rec}"
    t_eager, c_eager, _ = eager.end_epoch()
    t_graph, c_graph, _ = graph.end_epoch()
    for k in t_eager:
        assert math.isclose(t_graph[k], t_eager[k], rel_tol=loss_tol, abs_tol=1e-6), \
            f"{name}: loss term {k}: graph {t_graph[k]} eager {t_eager[k]}"
    n = 0
    for (pn, pe), pg in zip(eager_m.named_parameters(), graph_m.parameters()):
        if pe.grad is None:
            assert pg.grad is None or pg.grad.abs().max() == 0, f"{name}: {pn} has a grad only under the graph"
            continue
        err = _rel(pg.grad, pe.grad)
        assert err < grad_tol, f"{name}: grad of {pn} differs by {err:.2e} (relative L2)"
        n += 1
    assert n > 0


@_each_method
def test_graph_step_equals_eager_step_fp32(name):
    """One step on the same batch from the same state, autocast off and TF32 off."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _compare_one_step(name, amp=False, loss_tol=1e-5, grad_tol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@_each_method
def test_graph_step_equals_eager_step_bf16(name):
    _compare_one_step(name, amp=True, loss_tol=1e-2, grad_tol=2e-2)


def test_graph_training_follows_eager_training_with_lr_changes():
    """Three steps per epoch, two epochs with different lr: graph and eager weights agree;
    an lr of 0 leaves the weights where they are (the tensor lr reaches the graph)."""
    from refilled.training.step import TrainStep

    data = _batches(3)
    for name in ("student", "stage1", "refilled", DROPOUT):
        eager_m = _method(name)
        graph_m = copy.deepcopy(eager_m)
        steps = [TrainStep(eager_m, DEV, graph="off"), TrainStep(graph_m, DEV, graph="on")]
        for epoch, lr in enumerate((0.1, 0.02)):
            for s in steps:
                s.begin_epoch(epoch, lr)
                torch.manual_seed(epoch)   # the same dropout masks for both, as fit seeds each epoch
                for x, y in data:
                    s.step(x, y)
        assert steps[1].captures == 1
        _assert_states_close(name, eager_m.state_dict(), graph_m.state_dict())
        before = [p.detach().clone() for p in steps[1].params]
        steps[1].begin_epoch(2, 0.0)
        steps[1].step(*data[0])
        torch.cuda.synchronize()
        assert all(torch.equal(a, p) for a, p in zip(before, steps[1].params)), "lr 0 changed the weights"


def test_resume_recaptures_and_continues_like_the_uninterrupted_graph():
    """Weights and optimiser state written to a file and read back (as resume.pt is, with
    save_tensors/load_tensors): loading into the step that captured drops its graph and the
    next step captures again from the loaded state; a fresh model and step built from the
    file (a new process resuming) capture once. Both end where an uninterrupted run ends."""
    from refilled.io import load_tensors, save_tensors
    from refilled.training.step import TrainStep

    data = _batches(4)
    straight_m = _method("refilled")
    resumed_m = copy.deepcopy(straight_m)
    fresh_m = copy.deepcopy(straight_m)     # same architecture and buffers; its weights come from the file
    straight = TrainStep(straight_m, DEV, graph="on")
    straight.begin_epoch(0, 0.1)
    for x, y in data:
        straight.step(x, y)
    first = TrainStep(resumed_m, DEV, graph="on")
    first.begin_epoch(0, 0.1)
    for x, y in data[:2]:
        first.step(x, y)
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resume.pt"
        save_tensors(path, {"method": resumed_m.state_dict(), "optimizer": first.optimizer_state_dict()})
        with torch.no_grad():     # scramble what is in memory: only the file can bring it back
            for t in list(resumed_m.state_dict().values()):
                if t.is_floating_point():
                    t.add_(1.0)
        state = load_tensors(path, map_location=DEV)
        fresh_state = load_tensors(path, map_location=DEV)   # its own copy: a step trains the tensors it loaded
    resumed_m.load_state_dict(state["method"])
    first.load_optimizer_state_dict(state["optimizer"])
    assert first._replay is None, "loading optimiser state must drop the captured graph"
    for x, y in data[2:]:
        first.step(x, y)
    assert first.captures == 2 and first.mode == "on"

    fresh_m.load_state_dict(fresh_state["method"])
    fresh = TrainStep(fresh_m, DEV, graph="on")
    fresh.load_optimizer_state_dict(fresh_state["optimizer"])
    fresh.begin_epoch(0, 0.1)
    for x, y in data[2:]:
        fresh.step(x, y)
    assert fresh.captures == 1 and fresh.mode == "on"
    torch.cuda.synchronize()
    _assert_states_close("resume", straight_m.state_dict(), resumed_m.state_dict())
    _assert_states_close("resume in a fresh step", straight_m.state_dict(), fresh_m.state_dict())


def test_other_batch_shape_runs_eagerly_and_the_graph_stays_valid_on_cuda():
    from refilled.training.step import TrainStep

    data = _batches(3)
    short = (data[1][0][:B // 2], data[1][1][:B // 2])
    graph_m = _method("stage1")
    eager_m = copy.deepcopy(graph_m)
    runs = [(TrainStep(graph_m, DEV, graph="on"), graph_m), (TrainStep(eager_m, DEV, graph="off"), eager_m)]
    for step, m in runs:
        m.train()
        step.begin_epoch(0, 0.1)
        for x, y in (data[0], short, data[2]):
            step.step(x, y)
    graph = runs[0][0]
    assert graph.captures == 1 and graph.eager_fallbacks == 1 and graph.mode == "on"
    torch.cuda.synchronize()
    _assert_states_close("shape change", eager_m.state_dict(), graph_m.state_dict())


def test_non_finite_loss_is_flagged_under_capture():
    from refilled.methods.base import Method
    from refilled.models import build_model
    from refilled.training.step import NonFiniteLoss, TrainStep

    class Exploding(Method):
        def __init__(self, student):
            super().__init__(student)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def loss(self, x, y):
            logits = self.student(x).logits
            self.calls.add_(1)
            ce = F.cross_entropy(logits.float(), y)
            return logits, {"ce": torch.where(self.calls >= 3, torch.full_like(ce, float("nan")), ce)}

    torch.manual_seed(0)
    m = Exploding(build_model("wrn-16-1", C)).to(DEV)
    step = TrainStep(m, DEV, graph="on", check_every=1)
    step.begin_epoch(4, 0.1)
    data = _batches(5)
    try:
        for x, y in data:
            step.step(x, y)
    except NonFiniteLoss as exc:
        assert exc.epoch == 5 and exc.step == 3 and math.isnan(exc.terms["ce"]), exc
        assert step.mode == "on"
    else:
        raise AssertionError("a NaN loss went unnoticed")


def test_gpu_crop_flip_equals_cpu_and_stays_in_the_padded_image():
    """random_crop_flip on CUDA: the same crops as on the CPU for the same seed (the draws
    come from a CPU generator), every output a window of the padded image, flipped with
    probability 0.5 (4000 draws, |flips - 2000| < 126 = 4 sd), offsets uniform over
    0..2*pad (each of the 81 offsets within 4 sd of 4000/81)."""
    from refilled.data.batches import random_crop_flip

    n, pad, s = 4000, 4, 32
    base = (torch.arange(s * s, dtype=torch.float32).view(1, 1, s, s) + 1).expand(n, 3, s, s).contiguous()
    gpu = random_crop_flip(base.to(DEV), pad, torch.Generator().manual_seed(0))
    cpu = random_crop_flip(base, pad, torch.Generator().manual_seed(0))
    assert torch.equal(gpu.cpu(), cpu)
    padded = F.pad(base[:1, :1], (pad,) * 4)[0, 0].to(DEV)
    windows = torch.stack([padded[dy:dy + s, dx:dx + s] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)])
    cands = torch.cat([windows, windows.flip(-1)]).flatten(1)                  # [162, s*s]
    out = gpu[:, 0].flatten(1)
    match = (out[:, None, :] == cands[None]).all(-1)                           # [n, 162]
    assert (match.sum(1) == 1).all(), "an output is not exactly one window of the padded image"
    which = match.float().argmax(1)
    flips = int((which >= len(windows)).sum())
    assert abs(flips - n / 2) < 4 * math.sqrt(n / 4), f"{flips} flips of {n}"
    counts = torch.bincount(which % len(windows), minlength=len(windows)).float()
    p = 1 / len(windows)
    assert (counts - n * p).abs().max() < 4 * math.sqrt(n * p * (1 - p)), counts
    assert torch.equal(gpu[:, 0], gpu[:, 2])


def test_gpu_random_resized_crop_equals_cpu_and_flips_half():
    """random_resized_crop_flip on CUDA: the CPU's crops (within 0.255 of 0..255), and
    mirrored images in the output about half the time. Flips are counted in the output: the
    image is a left-to-right ramp, so a crop keeps the ramp rising and a mirrored one makes it
    fall (4000 images, |flips - 2000| < 4 sd = 126)."""
    from refilled.data.augment import random_resized_crop_boxes, random_resized_crop_flip

    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, generator=g)
    h, w = torch.full((64,), 375), torch.full((64,), 500)
    a = random_resized_crop_flip(imgs.to(DEV), h, w, 56, torch.Generator().manual_seed(0))
    b = random_resized_crop_flip(imgs, h, w, 56, torch.Generator().manual_seed(0))
    assert (a.cpu() - b).abs().max() < 0.255, "CUDA and CPU crops differ"

    n = 4000
    ramp = (torch.arange(64, dtype=torch.uint8) * 4).view(1, 1, 1, 64).expand(n, 3, 64, 64).contiguous()
    out = random_resized_crop_flip(ramp.to(DEV), torch.full((n,), 375), torch.full((n,), 500), 56,
                                   torch.Generator().manual_seed(1)).cpu()
    rise = out[:, 0, :, -1].mean(1) - out[:, 0, :, 0].mean(1)      # right edge minus left edge
    assert (rise.abs() > 1).all(), "a crop too narrow to tell its direction"
    flips = int((rise < 0).sum())
    assert abs(flips - n / 2) < 4 * math.sqrt(n / 4), f"{flips} mirrored images of {n}"
    assert torch.equal(out[:, 0], out[:, 2])
    boxes = random_resized_crop_boxes(torch.full((n,), 375), torch.full((n,), 500), torch.Generator().manual_seed(1))
    assert (boxes[:, 0] + boxes[:, 2] <= 375).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all()


def test_batches_on_cuda_equal_batches_on_cpu():
    from refilled.data.batches import Batches, task_split
    from refilled.data.datasets import ArraySplit, Dataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(4).repeat_interleave(10)
    ds = Dataset("t", list("abcd"), ArraySplit(images, labels), ArraySplit(images, labels), (.5,) * 3, (.25,) * 3)
    mk = lambda dev: Batches(task_split(ds.train, [0, 1, 2, 3]), ds, 8, True, dev, seed=5)
    gpu, cpu = mk(DEV), mk(torch.device("cpu"))
    for b_ in (gpu, cpu):
        b_.set_epoch(2)
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg.cpu(), yc) and torch.allclose(xg.cpu(), xc, atol=1e-5)


def test_cub_batches_on_cuda_take_the_cached_path_and_equal_the_cpu():
    """CUB files on CUDA: decoded once, augmented on the GPU (no PIL per sample); the same
    crops as the same path on the CPU, within 1e-3 normalised units."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fakedata import make_cub

    from refilled.data import load_dataset
    from refilled.data.batches import Batches, task_split

    with tempfile.TemporaryDirectory() as tmp:
        make_cub(tmp, n_classes=3, n_train_per_class=5, n_test_per_class=2, size=(64, 48))
        ds = load_dataset("cub200", tmp, verify_checksums=False)
        for train, split in ((True, ds.train), (False, ds.test)):
            mk = lambda dev, gpu_augment=None: Batches(task_split(split, [2, 0, 1]), ds, 4, train, dev, seed=2,
                                                       gpu_augment=gpu_augment, cache_dir=Path(tmp) / "cache")
            gpu, cpu = mk(DEV), mk(torch.device("cpu"), gpu_augment=True)   # CUDA: the default
            assert gpu.cached is not None, "CUDA must not take the per-sample PIL path for files"
            for b_ in (gpu, cpu):
                b_.set_epoch(1)
            pairs = list(zip(gpu, cpu))
            assert len(pairs) == len(cpu)
            for (xg, yg), (xc, yc) in pairs:
                assert xg.is_cuda and torch.equal(yg.cpu(), yc)
                assert (xg.cpu() - xc).abs().max() < 1e-3


def test_fit_on_cuda_with_graph_matches_eager_fit_and_resumes():
    """A short real fit (CE, 3 epochs) with and without the graph: the same metrics rows
    within bf16 noise (loss within 5e-2 relative). Then a graph run stopped after epoch 2
    (by its batches, before epoch 3 starts) and resumed from its resume.pt by a new fit on a
    new model: it trains only epoch 3, keeps the first two rows, and ends with the weights of
    the uninterrupted graph run."""
    from refilled.data.batches import Batches, task_split
    from refilled.data.datasets import ArraySplit, Dataset
    from refilled.io import load_tensors
    from refilled.methods.student import Student
    from refilled.models import build_model
    from refilled.training.loop import OptimConfig, fit

    class Stop(Exception):
        pass

    class StopAtEpoch(Batches):
        def __init__(self, *a, stop_at, **kw):
            super().__init__(*a, **kw)
            self.stop_at, self.epochs = stop_at, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)
            if epoch == self.stop_at:
                raise Stop(epoch)
            super().set_epoch(epoch)

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(64)
    images = (torch.rand(len(labels), 3, 32, 32, generator=g) * 80 + labels.view(-1, 1, 1, 1) * 40).to(torch.uint8)
    ds = Dataset("t", list("abcd"), ArraySplit(images, labels), ArraySplit(images, labels), (.3,) * 3, (.3,) * 3)
    cfg = OptimConfig(epochs=3, batch_size=32, lr=0.05)
    split = task_split(ds.train, [0, 1, 2, 3])
    rows, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "on"):
            train = Batches(split, ds, 32, True, DEV, seed=1)
            torch.manual_seed(1)
            models[mode] = build_model("wrn-16-1", 4)
            rows[mode] = fit(Student(models[mode]), train, lambda: {}, cfg, Path(tmp) / mode, DEV, 1, graph=mode)
        assert math.isclose(rows["on"]["ce"], rows["off"]["ce"], rel_tol=5e-2), rows
        assert abs(rows["on"]["train_acc"] - rows["off"]["train_acc"]) < 0.1, rows

        run = Path(tmp) / "resumed"
        torch.manual_seed(1)
        stopped = StopAtEpoch(split, ds, 32, True, DEV, seed=1, stop_at=2)
        try:
            fit(Student(build_model("wrn-16-1", 4)), stopped, lambda: {}, cfg, run, DEV, 1, graph="on")
        except Stop:
            pass
        else:
            raise AssertionError("the run was not stopped")
        assert load_tensors(run / "resume.pt")["epoch"] == 2
        torch.manual_seed(99)                    # another initialisation: only resume.pt can make it match
        model = build_model("wrn-16-1", 4)
        again = StopAtEpoch(split, ds, 32, True, DEV, seed=1, stop_at=-1)
        last = fit(Student(model), again, lambda: {}, cfg, run, DEV, 1, graph="on")
        assert again.epochs == [2], f"the resumed run trained epochs {again.epochs}, not only the third"
        assert last["epoch"] == 3
        straight = load_tensors(Path(tmp) / "on" / "resume.pt")["rows"]
        resumed = load_tensors(run / "resume.pt")["rows"]
        assert [r["epoch"] for r in resumed] == [1, 2, 3]
        for a, b in zip(straight, resumed):
            assert math.isclose(a["ce"], b["ce"], rel_tol=1e-2), (a, b)
    torch.cuda.synchronize()
    _assert_states_close("fit resume", models["on"].state_dict(), model.state_dict())


def _run_all() -> int:
    if not CUDA:
        print("test_cuda: no CUDA device; nothing to run")
        return 0
    print(f"test_cuda: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    failed = 0
    tests = sorted((k, v) for k, v in globals().items() if k.startswith("test_") and callable(v))
    calls = [(f"{k}[{m}]", lambda v=v, m=m: v(m)) if getattr(v, "each_method", False) else (k, v)
             for k, v in tests for m in (METHODS if getattr(v, "each_method", False) else [None])]
    for name, fn in calls:
        began = time.perf_counter()
        try:
            fn()
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.perf_counter() - began:.1f} s)")
            traceback.print_exc()
        else:
            print(f"ok   {name} ({time.perf_counter() - began:.1f} s)")
    print(f"test_cuda: {failed} failed" if failed else "test_cuda: all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_all())
