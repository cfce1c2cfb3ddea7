"""A temporary copy of the workflow, and Snakemake started in it: shared by the fault and Slurm tests."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_workflow(dst: Path, profiles: dict[str, dict]) -> Path:
    """Snakefile, params.yaml, workflow/, config/ (+ each of `profiles` as config/<name>.yaml),
    src/refilled, and data/raw/fashion-mnist as a link to this checkout's data, in `dst`."""
    raw = ROOT / "data" / "raw" / "fashion-mnist"
    assert raw.is_dir(), "Fashion-MNIST must be in data/raw (make data)"
    dst.mkdir(parents=True)
    for f in ("Snakefile", "params.yaml"):
        shutil.copy(ROOT / f, dst)
    for d in ("workflow", "config"):
        shutil.copytree(ROOT / d, dst / d)
    shutil.copytree(ROOT / "src" / "refilled", dst / "src" / "refilled", ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "data" / "raw").mkdir(parents=True)
    (dst / "data" / "raw" / "fashion-mnist").symlink_to(raw)
    for name, cfg in profiles.items():
        (dst / "config" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return dst


@contextlib.contextmanager
def started_snakemake_in(wf: Path, args, env: dict, log: Path):
    """`snakemake args` in `wf`, in its own session, its output in `log`; whatever of it is left
    is killed on the way out."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "snakemake"), *map(str, args)], cwd=wf, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
