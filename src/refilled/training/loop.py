"""The one training loop every method goes through.

SGD with Nesterov momentum, a multi-step or cosine schedule set per epoch, bf16 autocast
and channels-last on CUDA (fp32 on the CPU). Each batch goes through one
`refilled.training.step.TrainStep`: on CUDA the whole step (teacher forward, student forward and
backward, mining, losses, fused SGD) is captured in a CUDA graph and replayed
(``REFILLED_CUDA_GRAPH=0`` runs it eagerly); on the CPU the same step runs eagerly. Loss
terms and accuracy are accumulated on the device and read once per epoch; a non-finite
loss term stops the run within ``REFILLED_NAN_CHECK_EVERY`` (50) steps, naming epoch, step and terms.
After every epoch: one row of metrics.csv
and a resume checkpoint, both written atomically. A run started again in the same
directory with the same configuration continues after the last finished epoch; because
each epoch's data order and augmentation come from (seed, epoch), the resumed run ends
with the same weights as an uninterrupted one on the CPU.
SIGTERM (Slurm preemption or requeue, `scancel`, a runner stopping its jobs) stops the run
after the current step: the epoch in progress is abandoned, the last finished epoch's
checkpoint stays as it was written, and the process exits with 143 (128 + SIGTERM), a
failure for Snakemake and Slurm. A mid-epoch checkpoint is not written: the resumed run
would have to restore the batch order, the augmentation and dropout generators and the
device-side loss sums of the epoch at that step to stay bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

try:
    from tqdm import tqdm
except ImportError:   # a bare PyTorch image (scripts/gpu_check.sh): no progress bar
    def tqdm(iterable, **_):
        return iterable

from refilled.io import CheckpointError, load_tensors, save_tensors, write_csv
from refilled.methods.base import Method
from refilled.training.phases import Phases
from refilled.training.step import NonFiniteLoss, TrainStep

__all__ = ["OptimConfig", "NonFiniteLoss", "TrainStep", "fit", "lr_at", "resolve_device", "run_fingerprint",
           "set_cpu_threads", "RESUME_FILE", "METRICS_FILE", "nan_check_every", "TERMINATED_EXIT", "EPOCH_LOG_ENV"]

RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.csv"
TERMINATED_EXIT = 128 + signal.SIGTERM   # 143: the status a shell gives a process ended by SIGTERM
# If set, every finished epoch appends "<run dir>\t<epoch>" to this file (scripts/chaos.py
# counts the epochs a run trained, across kills and resumes)
EPOCH_LOG_ENV = "REFILLED_EPOCH_LOG"


@dataclass
class OptimConfig:
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"              # "multistep" or "cosine"
    milestones: tuple[float, ...] = (0.5, 0.7, 0.9)  # fractions of the epochs
    gamma: float = 0.2
    final_lr_fraction: float = 0.1            # cosine ends at lr * this
    eval_every: int = 1                       # evaluate every k epochs (and always after the last)
    extra: dict = field(default_factory=dict)  # anything else that must match on resume

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.schedule not in ("multistep", "cosine"):
            raise ValueError(f"schedule must be 'multistep' or 'cosine', got {self.schedule!r}")


# Version of what a fingerprint holds. 2: runs of catalog methods (method, task and every
# resolved hyper-parameter in `extra`); directories of format 1 are refused, not reused.
RUN_FORMAT = 2


def run_fingerprint(cfg: OptimConfig, seed: int) -> dict:
    """Everything that must match for a run directory to be resumed or reused."""
    return {"format": RUN_FORMAT, "optim": asdict(cfg), "seed": seed}


def lr_at(cfg: OptimConfig, epoch: int) -> float:
    if cfg.schedule == "cosine":
        final = cfg.lr * cfg.final_lr_fraction
        return final + (cfg.lr - final) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    # ceil: with few epochs a milestone never falls on epoch 0 (no decay before training)
    passed = sum(epoch >= math.ceil(round(m * cfg.epochs, 6)) for m in cfg.milestones)
    return cfg.lr * cfg.gamma**passed


def set_cpu_threads() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def nan_check_every() -> int:
    """Steps between checks for a non-finite loss (read per run: `refilled.tools.forkserver` imports
    this module before it knows a job's environment)."""
    return int(os.environ.get("REFILLED_NAN_CHECK_EVERY", "50"))


def fit(method: Method, train_batches, evaluate: Callable[[], dict[str, float]], cfg: OptimConfig,
        run_dir: str | Path, device: torch.device, seed: int, graph: str | bool | None = "auto",
        check_every: int | None = None, phases: Phases | None = None) -> dict:
    """Train `method` for cfg.epochs; return the last epoch's metrics row, plus "steps": how
    this call's steps ran (`TrainStep.record()`: graph, eager or graph with fallbacks).

    `evaluate()` runs after every epoch and returns the metrics to log (test accuracy,
    NCM accuracy, ...). `graph`: "auto" (CUDA graph on CUDA), "on", "off" or "emulate"
    (see `refilled.training.step`); it does not change the result beyond floating-point noise, so it
    is not part of the run's fingerprint. `phases` receives the seconds spent training,
    evaluating and writing."""
    phases = Phases() if phases is None else phases
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    method.to(device)
    if cuda:
        method.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    step = TrainStep(method, device, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, graph=graph,
                     check_every=nan_check_every() if check_every is None else check_every)
    fingerprint = run_fingerprint(cfg, seed)
    rows, start = _resume(run_dir, method, step, fingerprint)   # before any capture
    if rows:   # a killed job's metrics.csv may be gone (Snakemake deletes a failed job's outputs)
        _write_metrics(run_dir, rows)
    with _sigterm_flag() as terminated:
        _epochs(method, train_batches, evaluate, cfg, run_dir, step, fingerprint, seed, rows, start, terminated, phases)
    return {**rows[-1], "steps": step.record()}


def _epochs(method, train_batches, evaluate, cfg, run_dir, step, fingerprint, seed, rows, start, terminated, phases):
    for epoch in range(start, cfg.epochs):
        # the global generators (dropout masks) from (seed, epoch): a resumed run draws what an
        # uninterrupted one does; data order and augmentation have their own generators
        torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + 7)
        lr = lr_at(cfg, epoch)
        step.begin_epoch(epoch, lr)
        train_batches.set_epoch(epoch)
        began = time.perf_counter()
        try:
            terms, correct, seen = _train_epoch(method, train_batches, step, f"epoch {epoch + 1}/{cfg.epochs}",
                                                terminated)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc}; {_kept(run_dir, epoch)}",
                                exc.epoch, exc.step, exc.terms) from None
        except _Terminated:
            _exit_terminated(run_dir, epoch)
        for name, value in terms.items():   # end_epoch checked the flag; this catches overflow of the sums
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"non-finite loss at epoch {epoch + 1}: "
                    + ", ".join(f"{k}={v}" for k, v in terms.items())
                    + f"; {_kept(run_dir, epoch)}",
                    epoch + 1, None, terms)
        seconds = time.perf_counter() - began
        phases.add("train", seconds)
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        with phases("evaluation"):
            scores = evaluate() if due else {}
        train_acc = {"train_acc": round(correct / max(seen, 1), 6)} if method.trains_classifier else {}
        rows.append({"epoch": epoch + 1, "lr": lr, **{k: round(v, 6) for k, v in terms.items()},
                     "loss": round(sum(terms.values()), 6), **train_acc,
                     **{k: round(v, 6) for k, v in scores.items()}, "seconds": round(seconds, 3)})
        with phases("writing"):
            _write_metrics(run_dir, rows)
            save_tensors(run_dir / RESUME_FILE, {"fingerprint": fingerprint, "epoch": epoch + 1, "rows": rows,
                                                 "method": method.state_dict(), "optimizer": step.optimizer_state_dict()})
            _log_epoch(run_dir, epoch + 1)
        if terminated and epoch + 1 < cfg.epochs:   # arrived during evaluation or the writes; after the
                                                    # last epoch the run is finished and saved instead
            _exit_terminated(run_dir, epoch + 1)


class _Terminated(Exception):
    """Raised between steps once SIGTERM has arrived."""


@contextlib.contextmanager
def _sigterm_flag():
    """A list that SIGTERM appends to while training runs; the previous handler afterwards.
    Signal handlers belong to the main thread: elsewhere SIGTERM keeps its disposition."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_terminated(run_dir: Path, finished_epochs: int):
    print(f"refilled: SIGTERM: training stopped after {finished_epochs} finished epochs (an epoch in progress is "
          f"abandoned); {_kept(run_dir, finished_epochs)}; run the same command again to resume",
          file=sys.stderr, flush=True)
    raise SystemExit(TERMINATED_EXIT)


def _log_epoch(run_dir: Path, epoch: int) -> None:
    path = os.environ.get(EPOCH_LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:   # one short append per epoch: lines never interleave
            f.write(f"{run_dir.resolve()}\t{epoch}\n")


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    write_csv(run_dir / METRICS_FILE, rows, list(dict.fromkeys(k for row in rows for k in row)))


def _kept(run_dir: Path, finished_epochs: int) -> str:
    if finished_epochs == 0:
        return "no epoch had finished, so there is no checkpoint to resume from"
    return f"the last good checkpoint ({run_dir / RESUME_FILE}, epoch {finished_epochs}) is kept"


def _train_epoch(method, batches, step: TrainStep, desc, terminated=()):
    """One epoch of `step` over `batches`; (mean loss terms, correct, seen). No host sync
    per batch: the sums live on the device until `end_epoch`. Stops after the step during
    which `terminated` became non-empty (SIGTERM)."""
    method.train()
    for x, y in tqdm(batches, total=len(batches), desc=desc, leave=False, disable=None, mininterval=2):
        step.step(x, y)
        if terminated:
            raise _Terminated
    return step.end_epoch()


def _resume(run_dir: Path, method, step: TrainStep, fingerprint) -> tuple[list[dict], int]:
    path = run_dir / RESUME_FILE
    if not path.exists():
        return [], 0
    state = load_tensors(path)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by a run with another configuration ({state.get('fingerprint')}); "
            f"delete it to start this one ({fingerprint}) from scratch"
        )
    method.load_state_dict(state["method"])
    step.load_optimizer_state_dict(state["optimizer"])   # drops any captured graph
    return list(state["rows"]), int(state["epoch"])
