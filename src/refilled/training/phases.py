"""Where a job's wall time goes: start-up, data, teacher, training epochs, evaluation, writing
(and, apart, the wait for a free slot of `refilled pin`, which is scheduling, not the job).

A training run records these in its summary.json (`"phases"`, seconds) so that anyone can
repeat the measurement of how much of a job is spent training; `scripts/job_phases.py` sums
them over a run directory. Torch-free: the job's start comes from the
operating system, so start-up covers the interpreter and its imports.

The job starts when its process does (Linux: /proc, 10 ms resolution), or, for a job run by
the fork server (`refilled.tools.forkserver`), when the `refilled` command that asked for it did:
the server passes that moment in ``REFILLED_JOB_START``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

JOB_START_ENV = "REFILLED_JOB_START"
# In the order a job goes through them; "other" is what no phase covers (optimiser set-up, ...).
PHASES = ("startup", "data", "teacher", "train", "evaluation", "writing", "other")
_slot_wait = 0.0   # seconds `refilled pin` waited for a slot in this process (before the run began)


def note_slot_wait(seconds: float) -> None:
    global _slot_wait
    _slot_wait += seconds


def process_start_time() -> float | None:
    """This process's start, in seconds since the epoch; None where /proc does not tell."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22 of stat(5)
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started_after_boot)


def job_start_time() -> float | None:
    value = os.environ.get(JOB_START_ENV)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    return process_start_time()


class Phases:
    """Seconds per phase of one job. `with phases("data"): ...` adds the block's wall time;
    `end_startup()` closes the start-up (the job's start, or this object's creation, to now)."""

    def __init__(self, job_start: float | None = None):
        self.start = time.time() if job_start is None else job_start
        self.start_known = job_start is not None
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.slot_wait = 0.0

    @contextmanager
    def __call__(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        if name not in self.seconds or name == "other":
            raise KeyError(f"unknown phase {name!r}; phases are {', '.join(PHASES[:-1])}")
        self.seconds[name] += seconds

    def end_startup(self) -> None:
        """Start-up ends now; the time `refilled pin` waited for a slot is not part of it."""
        self.slot_wait = _slot_wait
        self.seconds["startup"] = time.time() - self.start - self.slot_wait

    def record(self) -> dict:
        """Seconds per phase, "other" (what no phase covers) and "total" (job start to now,
        less "slot_wait", the wait for a free slot of `refilled pin`, reported apart);
        "startup_measured" is false where the job's start was unknown (then start-up and
        total begin when this object was made)."""
        total = time.time() - self.start - self.slot_wait
        out = dict(self.seconds)
        out["other"] = max(0.0, total - sum(v for k, v in out.items() if k != "other"))
        return {**{k: round(v, 3) for k, v in out.items()}, "total": round(total, 3),
                "slot_wait": round(self.slot_wait, 3), "startup_measured": self.start_known}

