"""TrainStep on the CPU: the eager step, and the capture procedure in "emulate" mode (static
buffers, warm-up, snapshot/restore, replay) that CUDA runs with a real graph."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from refilled.data.batches import Batches, task_split
from refilled.methods.base import Method
from refilled.methods.student import Student
from refilled.models import build_model
from refilled.training.step import NonFiniteLoss, TrainStep, graph_mode_from_env
from refilled.training.loop import OptimConfig, fit
from host_sync import OpRecorder
from methods_cases import CASE_IDS, build_case

CPU = torch.device("cpu")
B, C = 8, 4


def batches(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.arange(C).repeat_interleave(B // C)[torch.randperm(B, generator=g)]
        x = torch.randn(B, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1) * 0.3
        out.append((x, y))
    return out


def make_method(name, seed=0):
    return build_case(name, prepare_batches=batches(2, seed=99), seed=seed)


METHODS = CASE_IDS


def run(method, mode, data, lrs=(0.1, 0.02), **kw):
    step = TrainStep(method, CPU, lr=lrs[0], graph=mode, **kw)
    method.train()
    stats = []
    for epoch, lr in enumerate(lrs):
        step.begin_epoch(epoch, lr)
        for x, y in data:
            step.step(x, y)
        stats.append(step.end_epoch())
    return step, stats


def state(method, step):
    out = {k: v.clone() for k, v in method.state_dict().items()}
    for i, p in enumerate(step.params):
        buf = step.optimizer.state[p].get("momentum_buffer")   # None: no grad (stage 1's head)
        out[f"momentum.{i}"] = None if buf is None else buf.clone()
    return out


@pytest.mark.parametrize("name", METHODS)
def test_emulated_capture_gives_the_eager_result_exactly(name):
    """Warm-up steps on the first batch, snapshot/restore, then replays on static buffers:
    the same weights, BN statistics, momentum buffers and epoch statistics as eager."""
    data = batches()
    m_eager, m_graph = make_method(name), make_method(name)
    s_eager, stats_eager = run(m_eager, "off", data)
    s_graph, stats_graph = run(m_graph, "emulate", data)
    assert s_graph.captures == 1 and s_graph.eager_fallbacks == 0
    a, b = state(m_eager, s_eager), state(m_graph, s_graph)
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), f"{name}: {k} differs"
    assert stats_eager == stats_graph
    terms, correct, seen = stats_eager[-1]
    assert seen == len(data) * B and 0 <= correct <= seen
    assert set(terms) == set(m_eager.loss(*data[0])[1])


def reference_loop(method, data, lrs, momentum=0.9, wd=5e-4):
    """The loop as it was before TrainStep: float lr per epoch, non-fused SGD, host sums."""
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lrs[0], momentum=momentum, weight_decay=wd, nesterov=True)
    method.train()
    out = []
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        sums, correct, seen = {}, 0, 0
        for x, y in data:
            logits, losses = method.loss(x, y)
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        out.append(({k: float(v) / seen for k, v in sums.items()}, correct, seen))
    return out


@pytest.mark.parametrize("name", METHODS)
def test_replayed_step_has_no_host_sync(name):
    """What CUDA captures for each method (forward of both networks, mining, losses,
    backward, fused SGD, accumulators), recorded op by op on the CPU: nothing that syncs
    with the host, no boolean-mask indexing (its kernel runs nonzero)."""
    method = make_method(name)
    step = TrainStep(method, CPU, lr=0.1, graph="emulate")
    method.train()
    step.begin_epoch(0, 0.1)
    data = batches(2)
    step.step(*data[0])                       # capture (warm-up and restore)
    with OpRecorder() as rec:
        step.step(*data[1])                   # one replay
    ops = rec.ops
    assert any("convolution" in op for op in ops) and any("_fused_sgd" in op or "sgd" in op for op in ops), ops
    assert not rec.bad(), rec.bad()


@pytest.mark.parametrize("name", ["student", "stage1", "refilled"])
def test_eager_step_matches_the_plain_loop(name):
    """Fused SGD with a tensor lr, on-device sums: the same training as the plain loop
    (float lr, unfused SGD) up to float rounding (tolerance 1e-5 relative, 1e-6 absolute)."""
    data = batches()
    m_ref, m_step = make_method(name), make_method(name)
    ref = reference_loop(m_ref, data, (0.1, 0.02))
    _, stats = run(m_step, "off", data)
    for (t_ref, c_ref, n_ref), (t, c, n) in zip(ref, stats):
        assert n == n_ref and c == c_ref
        assert t == pytest.approx(t_ref, rel=1e-5, abs=1e-6)
    for (k, a), b in zip(m_ref.state_dict().items(), m_step.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), k


def test_learning_rate_changes_reach_the_replayed_step():
    """lr is a tensor updated in place: set to 0, a replay leaves the weights unchanged.

    What this cannot see: an lr frozen at capture. The emulated replay calls the step
    function again, and the optimiser reads its param group's lr anew at every call, so an
    lr passed as a Python number (which a real CUDA graph would bake in at capture) still
    changes here. The CPU check of that is the last assertion, that the param group holds
    `step.lr` itself, the tensor `set_lr` fills in place; the frozen value itself is only
    visible under a real graph, in tests/test_cuda.py
    (test_graph_training_follows_eager_training_with_lr_changes, lr 0 after capture)."""
    data = batches(3)
    method = make_method("student")
    step = TrainStep(method, CPU, lr=0.1, graph="emulate")
    step.begin_epoch(0, 0.1)
    step.step(*data[0])
    before = [p.detach().clone() for p in step.params]
    step.begin_epoch(1, 0.0)
    step.step(*data[1])
    assert all(torch.equal(a, p) for a, p in zip(before, step.params))
    step.begin_epoch(2, 0.05)
    step.step(*data[2])
    assert not all(torch.equal(a, p) for a, p in zip(before, step.params))
    assert step.captures == 1
    assert step.optimizer.param_groups[0]["lr"] is step.lr


class Exploding(Method):
    """CE whose loss becomes NaN from the `at`-th call (1-based) on."""

    name = "exploding"

    def __init__(self, student, at):
        super().__init__(student)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.at = at

    def loss(self, x, y):
        logits = self.student(x).logits
        self.calls.add_(1)
        scale = torch.where(self.calls >= self.at, torch.tensor(float("nan")), torch.tensor(1.0))
        return logits, {"ce": F.cross_entropy(logits.float(), y) * scale, "zero": logits.float().sum() * 0}


@pytest.mark.parametrize("mode", ["off", "emulate"])
def test_non_finite_loss_names_epoch_step_and_terms(mode):
    data = batches(6)
    torch.manual_seed(0)
    method = Exploding(build_model("wrn-10-1", C), at=4)
    step = TrainStep(method, CPU, graph=mode, check_every=1)   # warm-up calls are undone (buffers restored)
    step.begin_epoch(2, 0.1)
    with pytest.raises(NonFiniteLoss, match=r"epoch 3, step 4: ce=nan") as info:
        for x, y in data:
            step.step(x, y)
    assert step.steps == 4 and info.value.epoch == 3 and info.value.step == 4
    assert info.value.terms["zero"] == 0.0


def test_non_finite_loss_is_caught_at_the_end_of_the_epoch_without_periodic_checks():
    data = batches(6)
    torch.manual_seed(0)
    method = Exploding(build_model("wrn-10-1", C), at=2)
    step = TrainStep(method, CPU, graph="off", check_every=0)
    step.begin_epoch(0, 0.1)
    for x, y in data:
        step.step(x, y)
    with pytest.raises(NonFiniteLoss, match="epoch 1, step 2"):
        step.end_epoch()


def test_non_finite_loss_in_fit_keeps_the_last_checkpoint(tmp_path):
    ds = _dataset()
    train = Batches(task_split(ds.train, [0, 1, 2, 3]), ds, 8, True, CPU, 0)
    torch.manual_seed(0)
    method = Exploding(build_model("wrn-10-1", C), at=len(train) + 3)   # second epoch, third step
    cfg = OptimConfig(epochs=3, batch_size=8, lr=0.05)
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 3: ce=nan.*epoch 1\) is kept"):
        fit(method, train, lambda: {}, cfg, tmp_path, CPU, 0, graph="emulate", check_every=1)
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 1


def test_optimizer_state_round_trip_and_recapture():
    data = batches(4)
    m1 = make_method("refilled")
    m2 = copy.deepcopy(m1)
    s1 = TrainStep(m1, CPU, graph="emulate")
    s1.begin_epoch(0, 0.1)
    for x, y in data[:2]:
        s1.step(x, y)
    saved = s1.optimizer_state_dict()
    assert all(isinstance(g["lr"], float) for g in saved["param_groups"])
    # a second process: load the weights and the optimiser, then continue
    s2 = TrainStep(m2, CPU, graph="emulate")
    m2.load_state_dict(m1.state_dict())
    s2.load_optimizer_state_dict(copy.deepcopy(saved))
    assert s2.optimizer.param_groups[0]["lr"] is s2.lr
    for s in (s1, s2):
        s.begin_epoch(1, 0.02)
    s1.invalidate()   # the uninterrupted run recaptures too, so both warm up from the same state
    for x, y in data[2:]:
        s1.step(x, y)
        s2.step(x, y)
    assert s2.captures == 1 and s1.captures == 2
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_other_batch_shape_runs_eagerly_and_the_graph_stays_valid():
    data = batches(3)
    small = (data[2][0][:6], data[2][1][:6])
    m_eager, m_graph = make_method("student"), make_method("student")
    for method, mode in ((m_eager, "off"), (m_graph, "emulate")):
        step = TrainStep(method, CPU, graph=mode)
        step.begin_epoch(0, 0.1)
        for x, y in (data[0], small, data[1]):
            step.step(x, y)
        terms, correct, seen = step.end_epoch()
        assert seen == 2 * B + 6
    for (k, a), b in zip(m_eager.state_dict().items(), m_graph.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


def test_capture_needs_a_warm_up_step():
    """Without one, the captured SGD would be a first step forever (momentum dropped) and
    the accumulators would be created, and zeroed, inside the graph."""
    with pytest.raises(ValueError, match="warmup_steps must be at least 1, got 0"):
        TrainStep(make_method("student"), CPU, graph="emulate", warmup_steps=0)


def test_graph_on_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        TrainStep(make_method("student"), CPU, graph="on")


@pytest.mark.parametrize("value,default,expected", [
    ("0", "on", "off"), ("false", "on", "off"), ("OFF", "on", "off"),
    ("1", "off", "on"), ("true", "off", "on"), ("On", "off", "on"),
    ("", "on", "on"), ("", "off", "off"),            # empty: the caller's default
    ("junk", "on", "on"), ("junk", "off", "off"),    # not understood: the caller's default
    (None, "on", "on"), (None, "off", "off"),        # unset
])
def test_graph_mode_from_environment(monkeypatch, value, default, expected):
    """REFILLED_CUDA_GRAPH as graph_mode_from_env reads it (what graph="auto" uses on CUDA).
    Each value is tried with both defaults, so a lookup that ignored the variable fails."""
    if value is None:
        monkeypatch.delenv("REFILLED_CUDA_GRAPH", raising=False)
    else:
        monkeypatch.setenv("REFILLED_CUDA_GRAPH", value)
    assert graph_mode_from_env(default) == expected


def test_graph_mode_from_environment_on_the_cpu(monkeypatch):
    """On a CPU "auto" stays eager whatever the variable says; an explicit mode ignores it."""
    monkeypatch.setenv("REFILLED_CUDA_GRAPH", "1")
    assert TrainStep(make_method("student"), CPU).mode == "off"
    monkeypatch.setenv("REFILLED_CUDA_GRAPH", "0")
    assert TrainStep(make_method("student"), CPU, graph="emulate").mode == "emulate"


def _dataset():
    from fakedata import tiny_dataset

    return tiny_dataset()


def test_fit_with_emulated_capture_equals_eager_fit(tmp_path):
    ds = _dataset()
    results = {}
    for mode in ("off", "emulate"):
        train = Batches(task_split(ds.train, [0, 1, 2, 3]), ds, 8, True, CPU, 3)
        torch.manual_seed(3)
        model = build_model("wrn-10-1", 4)
        cfg = OptimConfig(epochs=3, batch_size=8, lr=0.05)
        last = fit(Student(model), train, lambda: {}, cfg, tmp_path / mode, CPU, 3, graph=mode)
        results[mode] = (model.state_dict(), list(csv.DictReader(open(tmp_path / mode / "metrics.csv"))))
        steps = 3 * len(train)   # what fit says of how its steps ran
        assert last["steps"]["mode"] == {"off": "eager", "emulate": "graph"}[mode], last["steps"]
        assert last["steps"]["graph_steps" if mode == "emulate" else "eager_steps"] == steps
        assert last["steps"]["captures"] == (mode == "emulate") and last["steps"]["fallbacks"] == 0
    (a, rows_a), (b, rows_b) = results["off"], results["emulate"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(rows_a) == strip(rows_b)


def test_loaded_momentum_buffers_take_the_layout_of_their_params():
    """A resume checkpoint written from contiguous buffers, loaded into a channels-last model:
    the buffers are re-laid out as their params (the fused CUDA kernel requires it)."""
    m1 = make_method("student")
    s1 = TrainStep(m1, CPU, graph="off")
    s1.begin_epoch(0, 0.1)
    s1.step(*batches(1)[0])
    saved = s1.optimizer_state_dict()
    m2 = make_method("student").to(memory_format=torch.channels_last)
    s2 = TrainStep(m2, CPU, graph="off", channels_last=True)
    s2.load_optimizer_state_dict(saved)
    conv = [p for p in s2.params if p.dim() == 4]
    assert any(not p.is_contiguous() for p in conv)
    for p in s2.params:
        buf = s2.optimizer.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride()
    for p1, p2 in zip(s1.params, s2.params):
        assert torch.equal(s1.optimizer.state[p1]["momentum_buffer"], s2.optimizer.state[p2]["momentum_buffer"])
    s2.begin_epoch(1, 0.1)
    s2.step(*batches(1)[0])


# ---- a failed capture (the CUDA path, on the CPU, with a stand-in for torch.cuda) ----------


class _Stream:
    def wait_stream(self, other):
        pass


class FailingCuda:
    """What TrainStep's capture calls of torch.cuda; the graph context's exit (capture_end)
    raises, as a failed capture does. It runs the body on the CPU, so the capture's warm-up
    and captured step really change weights, momentum buffers, accumulators and the RNG."""

    def __init__(self):
        self.graph_entries = 0
        self.stream_now = self.caller = _Stream()

    def Stream(self, device=None):
        return _Stream()

    def current_stream(self, device=None):
        return self.stream_now

    def stream(self, s):
        import contextlib
        return contextlib.nullcontext()

    def set_stream(self, s):
        self.stream_now = s

    def synchronize(self, device=None):
        pass

    class CUDAGraph:
        def replay(self):
            raise AssertionError("a graph whose capture failed was replayed")

    def graph(self, g, stream=None, capture_error_mode=None):
        fake = self

        class Capture:
            def __enter__(self):
                fake.graph_entries += 1

            def __exit__(self, *exc):
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        return Capture()


def _dropout_method(seed=0):
    torch.manual_seed(seed)
    return Student(build_model("wrn-10-1", C, dropout=0.3))


def _on_cuda_path(step):
    """Take the real-graph branch ("on") of a step built on the CPU (the stand-in provides torch.cuda)."""
    step.mode = "on"
    return step


def _train_two_steps(method, data, on_cuda_path):
    torch.manual_seed(11)    # the dropout masks: both runs draw from the same generator state
    step = TrainStep(method, CPU, lr=0.1, graph="emulate" if on_cuda_path else "off")
    if on_cuda_path:
        _on_cuda_path(step)
    method.train()
    step.begin_epoch(0, 0.1)
    for x, y in data:
        step.step(x, y)
    return step, step.end_epoch()


def test_failed_capture_restores_the_state_runs_eagerly_and_disables_capture(monkeypatch):
    """The capture fails at capture_end: that step runs eagerly from the state before the
    capture (weights, BN statistics, momentum buffers, accumulators and the dropout RNG
    restored), so the run equals an eager run exactly; capture is then off for the process,
    so a second step object does not try it; the record says so."""
    import refilled.training.step as step_mod

    fake = FailingCuda()
    monkeypatch.setattr(step_mod, "cuda_api", fake)
    monkeypatch.setattr(step_mod, "_capture_broken", None)
    data = batches(3)
    m_eager, m_failed = _dropout_method(), _dropout_method()
    s_eager, stats_eager = _train_two_steps(m_eager, data[:2], on_cuda_path=False)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*previous error during capture"):
        s_failed, stats_failed = _train_two_steps(m_failed, data[:2], on_cuda_path=True)
    assert fake.graph_entries == 1 and fake.stream_now is fake.caller
    assert stats_failed == stats_eager
    a, b = state(m_eager, s_eager), state(m_failed, s_failed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "previous error during capture" in step_mod.capture_disabled()
    rec = s_failed.record()
    assert rec == {"mode": "eager", "requested": "on", "captures": 0, "capture_failures": 1, "fallbacks": 2,
                   "graph_steps": 0, "eager_steps": 2, "capture_disabled": step_mod.capture_disabled()}
    # a second step object in the same process: no capture is tried, its steps run eagerly
    second = _on_cuda_path(TrainStep(make_method("student"), CPU, graph="emulate"))
    second.begin_epoch(0, 0.1)
    second.step(*data[2])
    assert fake.graph_entries == 1
    assert second.record()["mode"] == "eager" and second.capture_failures == 0 and second.eager_fallbacks == 1


def test_record_says_how_the_steps_ran():
    data = batches(3)
    small = (data[2][0][:6], data[2][1][:6])
    expected = {"off": ("eager", 0, 0), "emulate": ("graph", 1, 0)}
    for mode, (want, captures, fallbacks) in expected.items():
        step = TrainStep(make_method("student"), CPU, graph=mode)
        assert step.record()["mode"] == "none"
        step.begin_epoch(0, 0.1)
        for x, y in data[:2]:
            step.step(x, y)
        rec = step.record()
        assert (rec["mode"], rec["captures"], rec["fallbacks"]) == (want, captures, fallbacks), rec
        assert rec["graph_steps"] + rec["eager_steps"] == 2
    step.step(*small)   # the emulated graph's step, a batch of another shape: eager, the graph kept
    rec = step.record()
    assert (rec["mode"], rec["fallbacks"], rec["graph_steps"], rec["eager_steps"]) == ("graph with fallbacks", 1, 2, 1)


def test_cuda_tests_cover_every_catalog_method():
    """tests/test_cuda.py compares the captured step with the eager one for every case of
    this file (so for every catalog method: a new method cannot be missed), plus dropout
    and a joint head; its parametrised tests run each of them."""
    import test_cuda
    from refilled.methods import CATALOG

    assert set(CATALOG) <= test_cuda.catalog_methods_covered()
    assert set(METHODS) <= set(test_cuda.METHODS)
    assert {test_cuda.DROPOUT, test_cuda.JOINT} <= set(test_cuda.METHODS)
    for fn in (test_cuda.test_graph_step_equals_eager_step_fp32, test_cuda.test_graph_step_equals_eager_step_bf16):
        params = [m.args for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        assert params == [("name", test_cuda.METHODS)], fn.__name__
