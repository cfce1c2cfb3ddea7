"""One training step, in one place: `TrainStep` owns the optimiser, the learning rate, the
on-device loss/accuracy accumulators and, on CUDA, the CUDA graph of the whole step.

The step is: zero grads, `method.loss(x, y)` under bf16 autocast (teacher forward, student
forward, mining, losses), backward, fused SGD (Nesterov), and in-place accumulation of the
loss terms, the correct count and a non-finite flag. Nothing in it reads a value back to
the host, so on CUDA it is captured once in a CUDA graph (``torch.cuda.graph``, "whole
network capture" of the PyTorch CUDA-graph notes) and replayed for every batch:
`step(x, y)` copies the batch into static input buffers and replays.

Capture follows the PyTorch notes: a few warm-up iterations on a side stream (they
create the momentum buffers, pick cuDNN algorithms and fill the allocator), grads set to
None, then capture on that same stream, in ``thread_local`` capture mode (other host
threads, such as a DataLoader's pin-memory thread, may keep calling CUDA). The warm-up iterations change weights, BN
statistics and momentum buffers, so everything they touch is snapshot before and copied
back after (in place: the graph keeps the addresses). A fresh momentum buffer is restored
as zeros, which gives exactly the first SGD step (dampening 0: ``buf = 0.9 * 0 + g = g``).
So the captured run computes the same updates as the eager one from the same state.

The learning rate is a 0-d float32 tensor on the device installed in every param group;
`set_lr` writes it in place, so the captured fused SGD kernel (``_fused_sgd_`` with a
tensor lr reads it through a pointer) sees each epoch's value. A CPU tensor lr would be
read once at capture (``lr.item()``) and frozen; `TrainStep` refuses that.

Modes (``graph``): ``"auto"`` (graph on CUDA, eager elsewhere; ``REFILLED_CUDA_GRAPH=0``
turns it off), ``"on"``, ``"off"``, and ``"emulate"``: the whole capture procedure
(static buffers, warm-up, snapshot and restore) with the "graph" replayed by calling the
step function eagerly on the static buffers. The CPU tests use it to cover the capture
code without a GPU; on CUDA ``"on"`` runs the same code with a real graph.

A failed capture (on CUDA): the weights, BN statistics, momentum buffers, accumulators and
the RNG state are restored from the snapshot, that step runs eagerly, and capture is
switched off for the whole process (`capture_disabled()` says why): on torch 2.11 a failed
``capture_end`` can leave the caching allocator believing a capture is under way (fixed
upstream in 2.12), and a second capture in that process would break every later CUDA call.
`record()` says how the steps ran (mode, captures, failures, fallbacks); runs write it into
summary.json.

Non-finite losses: every step records, on the device, the index of the first step whose
loss terms were not all finite and those terms. `check_finite()` reads that flag (one
host sync); `step` calls it every ``check_every`` steps and `end_epoch` always, and it
raises `NonFiniteLoss` naming the epoch, the step and the terms.
"""

from __future__ import annotations

import os
import warnings

import torch

CHANNELS_LAST = torch.channels_last
GRAPH_MODES = ("auto", "on", "off", "emulate")

# what the real-graph path calls; the CPU tests swap in a stand-in whose capture fails
cuda_api = torch.cuda

# set by the first failed capture in this process: the reason; no capture is tried after it
_capture_broken: str | None = None


def capture_disabled() -> str | None:
    """Why CUDA-graph capture is off for the rest of this process (None: it is not)."""
    return _capture_broken


def _disable_capture(reason: str) -> None:
    global _capture_broken
    if _capture_broken is None:
        _capture_broken = reason


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; `epoch` (1-based), `step` (1-based within the
    epoch) and `terms` ({name: value} at that step) say where."""

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None,
                 terms: dict[str, float] | None = None):
        super().__init__(message)
        self.epoch, self.step, self.terms = epoch, step, dict(terms or {})


def graph_mode_from_env(default: str = "auto") -> str:
    value = os.environ.get("REFILLED_CUDA_GRAPH")
    if value is None or value == "":
        return default
    return {"0": "off", "false": "off", "off": "off", "1": "on", "true": "on", "on": "on"}.get(value.lower(), default)


def make_sgd(params, lr: torch.Tensor, momentum: float, weight_decay: float, fused: bool) -> torch.optim.SGD:
    """SGD with Nesterov momentum and a tensor learning rate; fused where asked (CUDA and,
    since PyTorch 2.4, CPU have a fused SGD kernel taking a tensor lr)."""
    kwargs = {"fused": True} if fused else {}
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True, **kwargs)


class TrainStep:
    """The training step of `method` with its own SGD optimiser.

    Usage per epoch: ``begin_epoch(epoch, lr)``, ``step(x, y)`` per batch, then
    ``end_epoch() -> (mean loss terms, correct, seen)``. ``optimizer_state_dict()`` /
    ``load_optimizer_state_dict()`` save and restore the optimiser (the tensor lr is
    stored as a float); loading drops a captured graph, which is captured again at the
    next step.
    """

    def __init__(self, method: torch.nn.Module, device: torch.device, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, graph: str | bool | None = "auto", amp: bool | None = None,
                 channels_last: bool | None = None, fused: bool | None = None, warmup_steps: int = 3,
                 check_every: int = 0):
        self.method = method
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if graph is None:
            graph = "auto"
        if isinstance(graph, bool):
            graph = "on" if graph else "off"
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
        if graph == "auto":
            graph = graph_mode_from_env("on" if cuda else "off")
            if graph == "on" and not cuda:
                graph = "off"
        if graph == "on" and not cuda:
            raise ValueError("graph='on' needs a CUDA device; use 'emulate' to run the capture procedure on the CPU")
        if warmup_steps < 1:    # the first SGD step and the accumulators must exist before capture
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.mode = graph
        self.amp = cuda if amp is None else amp
        self.channels_last = cuda if channels_last is None else channels_last
        self.fused = _fused_supported(self.device) if fused is None else fused
        self.warmup_steps, self.check_every = warmup_steps, check_every
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.lr = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
        self.optimizer = make_sgd(self.params, self.lr, momentum, weight_decay, self.fused)
        self.epoch = 0              # 0-based, for messages
        self.steps = 0              # host-side steps this epoch
        self.seen = 0               # host-side images this epoch
        self.names: list[str] | None = None
        self._acc: dict[str, torch.Tensor] | None = None   # on-device accumulators
        self._replay = None         # callable replaying the captured step
        self._graph = None          # the torch.cuda.CUDAGraph (kept alive)
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        # how the steps ran, over the step's life (record() reports them)
        self.captures = 0           # successful captures
        self.capture_failures = 0   # captures that failed (the step then ran eagerly)
        self.eager_fallbacks = 0    # steps run eagerly although a graph was asked (shape change, failed capture)
        self.graph_steps = 0        # steps replayed from a graph (emulated or real)
        self.eager_steps = 0        # steps run eagerly, fallbacks included

    # ---- learning rate and epochs -------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(float(lr))    # in place: a captured graph reads it through its address

    def begin_epoch(self, epoch: int, lr: float) -> None:
        self.epoch = epoch
        self.set_lr(lr)
        self.steps = self.seen = 0
        if self._acc is not None:
            for t in self._acc.values():
                t.zero_()
            self._acc["bad_step"].fill_(-1)

    def end_epoch(self) -> tuple[dict[str, float], int, int]:
        """Mean loss terms over the epoch's images, correct predictions, images seen."""
        if self._acc is None or self.names is None:
            return {}, 0, 0
        self.check_finite()
        n = max(self.seen, 1)
        sums = self._acc["sums"].tolist()
        terms = {name: v / n for name, v in zip(self.names, sums)}
        return terms, int(self._acc["correct"]), self.seen

    def check_finite(self) -> None:
        """Raise `NonFiniteLoss` if some step since `begin_epoch` had a non-finite loss term."""
        if self._acc is None:
            return
        bad = int(self._acc["bad_step"])     # the one host sync
        if bad >= 0:
            terms = dict(zip(self.names or [], self._acc["bad_terms"].tolist()))
            raise NonFiniteLoss(f"non-finite loss at epoch {self.epoch + 1}, step {bad}: "
                                + ", ".join(f"{k}={v}" for k, v in terms.items()),
                                self.epoch + 1, bad, terms)

    # ---- optimiser state ------------------------------------------------------------------

    def optimizer_state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])
        return state

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:   # loading replaces the groups' settings
            group["lr"] = self.lr
            group["fused"] = True if self.fused else None
            group["foreach"] = None
        for p in self.params:   # the fused kernel wants buffers laid out as their params (channels-last)
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    self.optimizer.state[p][k] = torch.empty_like(p).copy_(v)
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the captured graph (after the optimiser's tensors were replaced)."""
        self._replay = self._graph = self._static = None

    # ---- the step ----------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._replay is None and self.mode != "off" and not self._capture_refused():
            self._capture(x, y)
        sx, sy = self._static if self._replay is not None else (None, None)
        if sx is not None and sx.shape == x.shape and sy.shape == y.shape:
            sx.copy_(x)
            sy.copy_(y)
            self._replay()
            self.graph_steps += 1
        else:   # eager: mode off, a failed or refused capture, or a batch of another shape (the graph stays valid)
            if self.mode != "off":
                self.eager_fallbacks += 1
            self.eager_steps += 1
            self._body(self._prepare(x), y, set_to_none=self._replay is None)
        self.steps += 1
        self.seen += int(y.shape[0])
        if self.check_every and self.steps % self.check_every == 0:
            self.check_finite()

    def _capture_refused(self) -> bool:
        return self.mode == "on" and capture_disabled() is not None

    def record(self) -> dict:
        """How the steps ran: mode "graph" (every step replayed), "eager" (none),
        "graph with fallbacks" (some ran eagerly although a graph was asked) or "none" (no
        step yet); the counts behind it; the reason capture is off in this process, if it is."""
        if self.graph_steps + self.eager_steps == 0:
            mode = "none"
        elif self.graph_steps == 0:
            mode = "eager"
        else:
            mode = "graph with fallbacks" if self.eager_fallbacks else "graph"
        out = {"mode": mode, "requested": self.mode, "captures": self.captures,
               "capture_failures": self.capture_failures, "fallbacks": self.eager_fallbacks,
               "graph_steps": self.graph_steps, "eager_steps": self.eager_steps}
        if self.mode == "on" and capture_disabled():
            out["capture_disabled"] = capture_disabled()
        return out

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=CHANNELS_LAST) if self.channels_last else x

    def _body(self, x: torch.Tensor, y: torch.Tensor, set_to_none: bool = True) -> None:
        """The whole step. No host sync, static shapes: this is what gets captured."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        # cache_enabled=False: the autocast weight-cast cache must not outlive a capture
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=False):
            logits, losses = self.method.loss(x, y)
        total = sum(losses.values())
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
            acc = self._accumulators(list(losses), values)
            acc["sums"].add_(values * y.shape[0])
            acc["correct"].add_((logits.detach().argmax(1) == y).sum())
            acc["count"].add_(1)
            bad = (~torch.isfinite(values).all()) & (acc["bad_step"] < 0)
            acc["bad_step"].copy_(torch.where(bad, acc["count"], acc["bad_step"]))
            acc["bad_terms"].copy_(torch.where(bad, values, acc["bad_terms"]))

    def _accumulators(self, names: list[str], values: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._acc is None:
            self.names = names
            dev = values.device
            self._acc = {"sums": torch.zeros_like(values), "correct": torch.zeros((), dtype=torch.long, device=dev),
                         "count": torch.zeros((), dtype=torch.long, device=dev),
                         "bad_step": torch.full((), -1, dtype=torch.long, device=dev),
                         "bad_terms": torch.zeros_like(values)}
        elif names != self.names:
            raise RuntimeError(f"the method's loss terms changed from {self.names} to {names}")
        return self._acc

    # ---- capture -------------------------------------------------------------------------

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        cuda = self.mode == "on"
        if cuda and self.lr.device.type != self.device.type:
            raise RuntimeError("a captured step needs the learning rate as a tensor on the step's device")
        # the layout eager would see: channels-last on CUDA, the batch's own strides otherwise
        sx = torch.empty_like(x, memory_format=CHANNELS_LAST if self.channels_last else torch.preserve_format)
        sx.copy_(x)
        sy = y.clone()
        self._static = (sx, sy)
        snap = self._snapshot()
        try:
            if cuda:
                self._capture_cuda(sx, sy, snap)
            else:   # emulate: the same procedure, replay = run the step function on the static buffers
                for _ in range(self.warmup_steps):
                    self._body(sx, sy)
                self._restore(snap)
                self.optimizer.zero_grad(set_to_none=True)
                self._replay = lambda: self._body(sx, sy)
        except Exception as exc:
            if not cuda:
                raise
            reason = f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"{reason}; running this step and every later one in this process eagerly",
                          RuntimeWarning, stacklevel=3)
            _disable_capture(reason)
            self.capture_failures += 1
            cuda_api.synchronize(self.device)
            self._restore(snap)      # weights, BN statistics, momentum buffers, accumulators, RNG
            self.optimizer.zero_grad(set_to_none=True)
            self.invalidate()
            return
        self.captures += 1

    def _capture_cuda(self, sx: torch.Tensor, sy: torch.Tensor, snap: dict) -> None:
        stream = cuda_api.Stream(device=self.device)
        stream.wait_stream(cuda_api.current_stream(self.device))
        with cuda_api.stream(stream):
            for _ in range(self.warmup_steps):
                self._body(sx, sy)
        cuda_api.current_stream(self.device).wait_stream(stream)
        self._restore(snap)
        self.optimizer.zero_grad(set_to_none=True)
        graph = cuda_api.CUDAGraph()
        caller_stream = cuda_api.current_stream(self.device)
        body_error = None
        try:
            # thread_local: a DataLoader pin-memory thread allocating pinned memory meanwhile
            # neither breaks the capture nor gets an error (the default 'global' would)
            with cuda_api.graph(graph, stream=stream, capture_error_mode="thread_local"):
                try:
                    self._body(sx, sy)
                except Exception as exc:   # report this, not the "invalid capture" that follows
                    body_error = exc
        except Exception:
            # a failing capture_end skips the stream context's exit: go back to the caller's stream
            cuda_api.set_stream(caller_stream)
            if body_error is None:
                raise
        if body_error is not None:
            raise body_error
        self._graph, self._replay = graph, graph.replay

    def _snapshot(self) -> dict:
        tensors = self.params + [b for b in self.method.buffers()]
        opt_state = {}
        for p in self.params:
            state = self.optimizer.state.get(p)
            opt_state[p] = None if not state else {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                                   for k, v in state.items()}
        acc = None if self._acc is None else {k: v.clone() for k, v in self._acc.items()}
        # the warm-up draws random numbers (dropout masks): the replays must draw what eager steps would
        rng = {"cpu": torch.get_rng_state(),
               "cuda": cuda_api.get_rng_state(self.device) if self.device.type == "cuda" else None}
        return {"tensors": [(t, t.detach().clone()) for t in tensors], "opt": opt_state, "acc": acc, "rng": rng}

    @torch.no_grad()
    def _restore(self, snap: dict) -> None:
        for t, saved in snap["tensors"]:
            t.copy_(saved)
        for p, saved in snap["opt"].items():
            state = self.optimizer.state.get(p, {})
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if saved is None:
                    v.zero_()       # a fresh momentum buffer: zeros give exactly the first step
                else:
                    v.copy_(saved[k])
        torch.set_rng_state(snap["rng"]["cpu"])
        if snap["rng"]["cuda"] is not None:
            cuda_api.set_rng_state(snap["rng"]["cuda"], self.device)
        if self._acc is not None:
            for k, v in self._acc.items():
                if snap["acc"] is not None:
                    v.copy_(snap["acc"][k])
                else:
                    v.fill_(-1 if k == "bad_step" else 0)


def _fused_supported(device: torch.device) -> bool:
    """Fused SGD with a tensor lr: CUDA always; CPU from PyTorch 2.4 (probed once)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    global _CPU_FUSED
    if _CPU_FUSED is None:
        try:
            p = torch.nn.Parameter(torch.ones(2))
            p.grad = torch.ones(2)
            opt = make_sgd([p], torch.tensor(0.1), 0.9, 5e-4, fused=True)
            opt.step()
            opt.step()
            _CPU_FUSED = True
        except (RuntimeError, TypeError, ValueError):
            _CPU_FUSED = False
    return _CPU_FUSED


_CPU_FUSED: bool | None = None
