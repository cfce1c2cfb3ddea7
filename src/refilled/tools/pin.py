"""`refilled pin`: run one refilled command in a free GPU slot and on its own CPU cores.

Slots are lock files (``fcntl.flock``) in a lock directory; a slot is held for as long as the
process lives. This module does not import torch (the Snakefile imports `count_gpus` from it).

GPU ids: when ``CUDA_VISIBLE_DEVICES`` is set, the GPUs it lists are the ones shared (the
visible devices win), and an explicit ``--gpus N`` that disagrees with their number is an
error; when it is unset, ``--gpus N`` means GPUs 0..N-1 and ``--gpus auto`` counts them with
``nvidia-smi -L``, except inside a Slurm job (``SLURM_JOB_ID``): Slurm sets ``CUDA_VISIBLE_DEVICES``
to the GPUs it gave the job, so a job without it was given none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELD_SLOTS: list = []   # open lock files: a slot is held as long as this process lives


class PinError(ValueError):
    """A pin request that cannot be met as given (reported as a one-line error, exit status 2)."""


def visible_gpus(environ=None) -> list[str] | None:
    """The GPU ids ``CUDA_VISIBLE_DEVICES`` lists, or None when it is unset.

    As CUDA reads it, an entry ``-1`` hides itself and every device after it."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = []
    for d in visible.split(","):
        d = d.strip()
        if d == "-1":
            break
        if d:
            ids.append(d)
    return ids


def _nvidia_smi_count() -> int:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def gpu_ids(spec: str = "auto", environ=None) -> list[str]:
    """The ids of the GPUs to share, for ``--gpus SPEC`` (a number or ``auto``)."""
    visible = visible_gpus(environ)
    if spec == "auto":
        if visible is not None:
            return visible
        if "SLURM_JOB_ID" in (os.environ if environ is None else environ):
            return []   # a Slurm job that was given no GPU: the node's GPUs belong to other jobs
        return [str(i) for i in range(_nvidia_smi_count())]
    try:
        n = int(spec)
    except ValueError:
        raise PinError(f"--gpus must be a number or auto, got {spec!r}") from None
    if n < 0:
        raise PinError(f"--gpus must be >= 0 or auto, got {spec}")
    if visible is not None and len(visible) != n:
        raise PinError(f"--gpus {n} disagrees with CUDA_VISIBLE_DEVICES={','.join(visible) or '(empty)'} "
                       f"({len(visible)} GPU{'s' if len(visible) != 1 else ''} visible); "
                       f"give --gpus {len(visible)} or auto, or change CUDA_VISIBLE_DEVICES")
    return visible if visible is not None else [str(i) for i in range(n)]


def count_gpus(spec: str = "auto", environ=None) -> int:
    """How many GPUs ``--gpus SPEC`` shares (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``, for auto)."""
    return len(gpu_ids(spec, environ))


def take_slot(lock_dir: Path, names: list[str]) -> int:
    """Index of the first free slot among `names` (blocking until one is free); the lock is kept."""
    import fcntl
    import time

    from refilled.training.phases import note_slot_wait

    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    began = time.monotonic()
    while True:
        for i, name in enumerate(names):
            f = open(lock_dir / f"{name}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            HELD_SLOTS.append(f)
            note_slot_wait(time.monotonic() - began)
            return i
        if not waited:
            print(f"refilled pin: all {len(names)} slots in {lock_dir} are busy; waiting", file=sys.stderr, flush=True)
            waited = True
        time.sleep(1.0)


def cmd_pin(args, run) -> int:
    """Take the slots, then `run(argv)` the wrapped command: `run` is `refilled.cli.main`, handed
    in by the caller so that this module imports nothing from the layer above it."""
    import tempfile

    rest = list(args.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest or rest[0] == "pin":
        raise PinError("pin needs a refilled command to run after '--', e.g. pin --threads 1 -- train-teacher ...")
    if args.per_gpu < 1 or args.threads < 0:
        raise PinError("--per-gpu must be >= 1 and --threads >= 0")
    lock_dir = args.lock_dir or Path(tempfile.gettempdir()) / f"refilled-slots-{os.getuid()}"
    ids = gpu_ids(args.gpus)
    n_gpus = len(ids)
    if n_gpus > 0:
        # slot s -> GPU s % n: the first jobs spread over the GPUs
        slots = [f"gpu{ids[s % n_gpus]}-slot{s // n_gpus}" for s in range(n_gpus * args.per_gpu)]
        gpu = ids[take_slot(lock_dir, slots) % n_gpus]
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        print(f"refilled pin: GPU {gpu}", file=sys.stderr, flush=True)
    if args.threads and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        n_slots = len(cores) // args.threads
        if n_slots >= 1:
            k = take_slot(lock_dir, [f"cpu{cores[s * args.threads]}-x{args.threads}" for s in range(n_slots)])
            mine = cores[k * args.threads:(k + 1) * args.threads]
            os.sched_setaffinity(0, mine)
            print(f"refilled pin: CPU cores {mine}", file=sys.stderr, flush=True)
    return run(rest)


run_pinned = cmd_pin
