"""A finished run survives the deletion of its outputs by Snakemake's ``--rerun-incomplete``.

When ``snakemake`` dies while a training job runs (killed, lost login node, a Slurm job that
outlives the process that submitted it) and that job then finishes, Snakemake still holds the
job as incomplete: the next ``snakemake --rerun-incomplete`` deletes the job's declared outputs
(summary.json, model.pt, metrics.csv, lambda_i.csv) and runs it again. Without help the run
would train again from scratch, because a finished run deletes its resume checkpoint.

So a finished run keeps hard links of its files in a hidden ``.finished/`` directory of the run
directory (:func:`archive`; no extra disk space). When a run starts and finds no summary.json
but a ``.finished/summary.json`` with the same fingerprint (the same configuration), its files
are linked back in place, with fresh modification times so that Snakemake sees outputs newer
than the job's inputs, instead of training (:func:`restore`). An archive of another
configuration is never restored; the next finished run replaces it.

To train a finished run again on purpose (say, after a fix to the training code), delete the
run directory, ``.finished/`` included, as for any finished run.

Pure Python: no torch here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

FINISHED_DIR = ".finished"
SUMMARY = "summary.json"
RESUME = "resume.pt"


def _files(directory: Path) -> list[str]:
    """The run's files in `directory`: plain, not hidden (temporary files are), no checkpoint."""
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name not in (SUMMARY, RESUME))


def _link(src: Path, dst: Path) -> None:
    """Make `dst` a hard link of `src`, atomically (a killed process leaves `dst` as it was)."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def archive(run_dir: str | os.PathLike) -> bool:
    """Hard-link the finished run's files into ``run_dir/.finished/``, summary.json last (it marks
    a complete archive). Returns False, with a warning, where the file system has no hard links."""
    run_dir = Path(run_dir)
    dst = run_dir / FINISHED_DIR
    if not (run_dir / SUMMARY).is_file():
        raise FileNotFoundError(f"{run_dir / SUMMARY}: not a finished run, nothing to archive")
    try:
        dst.mkdir(exist_ok=True)
        (dst / SUMMARY).unlink(missing_ok=True)         # from here on the archive is not complete
        for name in _files(dst):
            (dst / name).unlink()
        for name in _files(run_dir) + [SUMMARY]:
            _link(run_dir / name, dst / name)
    except OSError as exc:
        (dst / SUMMARY).unlink(missing_ok=True)
        print(f"refilled: could not keep hard links of {run_dir} in {dst} ({exc}); if Snakemake deletes "
              "this run's outputs as incomplete, it will be trained again", file=sys.stderr)
        return False
    return True


def restore(run_dir: str | os.PathLike, fingerprint: dict) -> dict | None:
    """Put back the archived files of a finished run with this fingerprint; its summary, or None
    (no archive, an incomplete one, or one of another configuration: train as usual)."""
    run_dir = Path(run_dir)
    src = run_dir / FINISHED_DIR
    try:
        summary = json.loads((src / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    names = _files(src)
    now = time.time()
    for name in names + [SUMMARY]:                      # summary.json last: it marks a finished run
        _link(src / name, run_dir / name)
        os.utime(run_dir / name, (now, now))
    (run_dir / RESUME).unlink(missing_ok=True)
    print(f"{run_dir}: finished already (outputs restored from {src}), nothing to train")
    return summary
