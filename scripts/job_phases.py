#!/usr/bin/env python3
"""Sum the phases of every training job under a run directory: how much of the jobs' wall
time went into training epochs, and where the rest went.

    python scripts/job_phases.py results/runs/demo [--benchmarks results/benchmarks/demo] [--csv out.csv]

Each finished run's summary.json holds `phases` (seconds: startup, data, teacher, train,
evaluation, writing, other; total = the job's process start to its summary). Where Snakemake's
benchmark files are given (the same relative paths, `.tsv`), their wall time (`s`, which also
covers the shell and the `refilled` command's own start) is summed beside it. The time a job
waited for a free slot of `refilled pin` (`slot_wait`: other jobs held the cores) is scheduling,
not the job's, and is left out of both. Torch-free.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from refilled.training.phases import PHASES  # noqa: E402


def summaries(runs: Path):
    """(run directory relative to `runs`, summary) of every finished training run."""
    for path in sorted(runs.rglob("summary.json")):
        if ".finished" in path.parts:
            continue
        summary = json.loads(path.read_text(encoding="utf-8"))
        if "fingerprint" in summary:          # a training run (joint references train nothing)
            yield path.parent.relative_to(runs), summary


def benchmark_seconds(benchmarks: Path, run: Path) -> float | None:
    path = benchmarks / f"{run}.tsv"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return float(rows[-1]["s"]) if rows else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="a run directory, e.g. results/runs/demo")
    parser.add_argument("--benchmarks", type=Path, help="Snakemake's benchmark directory of the same runs "
                        "(default: results/benchmarks/<profile> beside results/runs/<profile>, if it exists)")
    parser.add_argument("--csv", type=Path, help="also write one row per job here")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        print(f"job_phases: error: {args.runs} is not a directory", file=sys.stderr)
        return 2
    benchmarks = args.benchmarks
    if benchmarks is None and args.runs.parent.name == "runs":
        guess = args.runs.parent.parent / "benchmarks" / args.runs.name
        benchmarks = guess if guess.is_dir() else None

    rows, missing = [], []
    for run, summary in summaries(args.runs):
        phases = summary.get("phases")
        if phases is None:
            missing.append(str(run))
            continue
        row = {"run": str(run), **{k: phases[k] for k in (*PHASES, "total")}, "slot_wait": phases.get("slot_wait", 0.0)}
        if benchmarks is not None:
            row["benchmark_s"] = benchmark_seconds(benchmarks, run)
        rows.append(row)
    if not rows:
        print(f"job_phases: error: no training run under {args.runs} records its phases"
              + (f" ({len(missing)} runs written before phases were recorded)" if missing else ""), file=sys.stderr)
        return 2

    total = sum(r["total"] for r in rows)
    print(f"{len(rows)} training jobs under {args.runs}"
          + (f" ({len(missing)} older runs without phases left out)" if missing else ""))
    print(f"{'phase':<12}{'seconds':>10}{'share':>8}{'per job':>9}")
    for name in PHASES:
        s = sum(r[name] for r in rows)
        print(f"{name:<12}{s:>10.1f}{s / total:>8.1%}{s / len(rows):>9.2f}")
    print(f"{'total':<12}{total:>10.1f}{1:>8.0%}{total / len(rows):>9.2f}")
    train = sum(r["train"] for r in rows)
    print(f"inside training epochs: {train / total:.1%} of the jobs' own wall time")
    waited = sum(r["slot_wait"] for r in rows)
    if waited >= 0.05:
        print(f"not counted above: {waited:.1f} s waiting for a free slot of `refilled pin` (other jobs held them)")
    bench = [r for r in rows if r.get("benchmark_s") is not None]
    if bench:
        wall = sum(r["benchmark_s"] - r["slot_wait"] for r in bench)
        share = sum(r["train"] for r in bench) / wall
        print(f"Snakemake benchmarks ({len(bench)} jobs): {wall:.1f} s of job wall time"
              + (" less the slot waits" if waited >= 0.05 else "") + f", {share:.1%} inside training epochs")
    if args.csv:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fields, lineterminator="\n").writerows([dict(zip(fields, fields)), *rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
