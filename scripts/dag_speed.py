#!/usr/bin/env python3
"""How long Snakemake takes to plan each profile's DAG (`snakemake -n TARGET --config profile=P`).

Prints, per profile: the jobs planned, the wall seconds of the dry run, ms per job, and the
same with Snakemake's fixed start-up taken out (a dry run of one split file of the same
profile, measured in the same process run). Each dry run is repeated --repeat times and the
fastest is kept. Run it with nothing else on the machine.

    .venv/bin/python scripts/dag_speed.py                       # every profile in config/
    .venv/bin/python scripts/dag_speed.py --profiles paper demo --target results/table2.csv
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def dry_run(target: str, profile: str, workdir: Path) -> tuple[float, int]:
    """(wall seconds, jobs planned) of one dry run; the target comes before --config."""
    cmd = [str(SNAKEMAKE), "-n", "--cores", "8", target, "-d", str(workdir), "-s", str(ROOT / "Snakefile"),
           "--config", f"profile={profile}"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"dag_speed: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return seconds, 0
    totals = re.findall(r"^total\s+(\d+)$", text, flags=re.M)
    return seconds, int(totals[-1])


def one_split(profile: str, workdir: Path) -> str:
    """A single-job target of the profile: its first split file (the smallest DAG it has)."""
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.experiments.profile import fmt, load_profile

    exp = next(iter(load_profile(ROOT, profile)["experiments"].values()))
    return (f"data/splits/{exp['dataset']}/{exp.get('class_order', 'seeded')}/h{exp['classes_per_task']}/"
            f"r{fmt(exp['ratios'][0])}/seed0.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=sorted(p.stem for p in (ROOT / "config").glob("*.yaml")))
    ap.add_argument("--target", default="all")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to plan (default: a new empty directory, so nothing is already made)")
    args = ap.parse_args()
    if args.workdir is None:
        import tempfile
        args.workdir = Path(tempfile.mkdtemp(prefix="dag-speed-"))
    print(f"{'profile':<10} {'jobs':>6} {'seconds':>8} {'ms/job':>7} {'start-up s':>10} {'ms/job net':>10}")
    for profile in args.profiles:
        startup = min(dry_run(one_split(profile, args.workdir), profile, args.workdir)[0] for _ in range(args.repeat))
        seconds, jobs = min(dry_run(args.target, profile, args.workdir) for _ in range(args.repeat))
        per_job = 1000 * seconds / jobs if jobs else float("nan")
        net = 1000 * (seconds - startup) / jobs if jobs else float("nan")
        print(f"{profile:<10} {jobs:>6} {seconds:>8.1f} {per_job:>7.1f} {startup:>10.1f} {net:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
