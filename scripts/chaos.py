#!/usr/bin/env python3
"""Chaos run: the smoke profile's `all`, killed N times at random moments, resumed each time with
the command the README and docs/troubleshooting.md give, then compared with a run never interrupted.

    .venv/bin/python scripts/chaos.py --kills 20                 # seed drawn and printed
    .venv/bin/python scripts/chaos.py --kills 3 --seed 7 --reference DIR

Kinds of kill, drawn from --seed with the moments (seconds after the latest start of Snakemake):

- snakemake: SIGKILL to Snakemake's whole process group, its jobs included, as a dying
  terminal does. Killing Snakemake alone would leave its jobs running as orphans that race the
  resumed Snakemake in the same run directories, which no documented procedure allows.
  Resumed with `snakemake --unlock all ...` then `snakemake --cores N all --rerun-incomplete ...`.
- job: SIGKILL to one running training job (a lost node, the OOM killer).
- job-term: SIGTERM to one running training job, SIGKILL after --grace seconds if it is still
  there (Slurm preemption). After a job's death Snakemake stops; it is resumed with the same
  command it ran ("run the same command again").

A job kill waits for a training job to be running. After N kills the run is let finish. Then:
every table and the data of every figure are compared byte for byte with the reference run's,
every run's model.pt (tensors) and metrics.csv (all but the `seconds` column) likewise. Every
finished epoch is logged through REFILLED_EPOCH_LOG (refilled.training.loop): a run seen with a
summary.json that logs an epoch afterwards was trained again. Prints kills by kind, resumes,
runs retrained and epochs trained beyond the reference run's; exit 0 only when all is identical
and no finished run was trained again, 1 otherwise, 2 on bad arguments.

The reference (--reference DIR) is a directory where `snakemake all` of the smoke profile has
finished, e.g. a clone; without it, one is run first in WORKDIR/reference.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KINDS = ("snakemake", "job", "job-term")
TRAINING_COMMANDS = {"train", "train-teacher"}           # refilled subcommands that run train.fit
FIGURE_DATA = (".csv", ".json", ".tsv", ".txt", ".md")   # figures/: data files, not the rendered images
EPOCH_LOG_ENV = "REFILLED_EPOCH_LOG"                     # refilled.training.loop.EPOCH_LOG_ENV (no torch import here)


def copy_workflow(dst: Path) -> Path:
    """What a clone has for the workflow, with data/raw/fashion-mnist linked to this checkout's."""
    raw = ROOT / "data" / "raw" / "fashion-mnist"
    dst.mkdir(parents=True)
    for f in ("Snakefile", "params.yaml"):
        shutil.copy(ROOT / f, dst)
    for d in ("workflow", "config", "scripts"):
        shutil.copytree(ROOT / d, dst / d)
    shutil.copytree(ROOT / "src" / "refilled", dst / "src" / "refilled", ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "data" / "raw").mkdir(parents=True)
    (dst / "data" / "raw" / "fashion-mnist").symlink_to(raw)
    return dst


class Workflow:
    """Snakemake in `wf`, started in its own session (so that its process group is its own)."""

    def __init__(self, wf: Path, cores: int, profile: str, epoch_log: Path):
        self.wf, self.profile = wf, profile
        self.base = ["all", "--cores", str(cores)]
        # jobs run through the fork server (refilled.tools.forkserver) stay in Snakemake's session: the
        # `refilled` command is the job to kill (the server kills its child, or passes SIGTERM on)
        self.env = {**os.environ,
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    EPOCH_LOG_ENV: str(epoch_log), "TMPDIR": str(wf.parent / "tmp")}
        (wf.parent / "tmp").mkdir(exist_ok=True)
        self.log = open(wf.parent / "snakemake.log", "a")
        self.proc: subprocess.Popen | None = None

    def argv(self, *extra: str) -> list[str]:    # targets and flags before --config, which takes the rest
        return [str(BIN / "snakemake"), *self.base, *extra, "--config", f"profile={self.profile}"]

    def start(self, *extra: str) -> None:
        self.log.write(f"\n==== {' '.join(self.argv(*extra))}\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.argv(*extra), cwd=self.wf, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def unlock(self) -> None:
        argv = [str(BIN / "snakemake"), "--unlock", "all", "--config", f"profile={self.profile}"]
        self.log.write(f"\n==== {' '.join(argv)}\n")
        self.log.flush()
        rc = subprocess.run(argv, cwd=self.wf, env=self.env, stdout=self.log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"snakemake --unlock failed ({rc}); see {self.log.name}")

    def session(self) -> dict[int, list[str]]:
        """{pid: argv} of the live processes of Snakemake's session (itself, its jobs, theirs)."""
        sid = self.proc.pid
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) != sid or fields[0] == "Z":
                    continue
                found[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, IndexError, ValueError):
                continue
        return found

    def training_jobs(self) -> list[int]:
        """The `refilled ... train` processes (not the shells that started them: their command is one word)."""
        return sorted(pid for pid, argv in self.session().items()
                      if any(Path(a).name == "refilled" for a in argv[:2]) and TRAINING_COMMANDS & set(argv))

    def kill_all(self) -> None:
        """SIGKILL to Snakemake's process group, then to anything left in its session; wait until all are gone."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 60
        while left := self.session():
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the killed Snakemake survive SIGKILL: {left}")
            time.sleep(0.05)


class FinishedRuns:
    """Which runs had a summary.json, and how far the epoch log was at that moment."""

    def __init__(self, wf: Path, epoch_log: Path):
        self.runs, self.epoch_log = wf / "results" / "runs", epoch_log
        self.seen: dict[str, int] = {}      # run dir -> epoch log size when first seen finished

    def look(self) -> None:
        if not self.runs.is_dir():
            return
        found = {str(p.parent.resolve()) for p in self.runs.rglob("summary.json") if p.parent.name != ".finished"}
        found |= {str(p.parent.parent.resolve()) for p in self.runs.rglob(".finished/summary.json")}
        size = self.epoch_log.stat().st_size if self.epoch_log.exists() else 0   # after the scan: never too early
        for run in found:
            self.seen.setdefault(run, size)

    def retrained(self) -> dict[str, int]:
        """{run dir: epochs logged after it was seen finished}."""
        out: collections.Counter = collections.Counter()
        offset = 0
        with open(self.epoch_log, "rb") as f:
            for line in f:
                run = line.decode().split("\t")[0]
                if run in self.seen and offset >= self.seen[run]:
                    out[run] += 1
                offset += len(line)
        return dict(out)


def epochs_in(runs: Path) -> int:
    """Epochs the run directories under `runs` hold (rows of their metrics.csv)."""
    return sum(len(read_rows(p)) for p in runs.rglob("metrics.csv") if ".finished" not in p.parts)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def outputs(wf: Path) -> dict[str, list[Path]]:
    """The files to compare, by kind, relative to `wf`."""
    rel = lambda ps: sorted(p.relative_to(wf) for p in ps
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(wf).parts))
    results = wf / "results"
    return {
        "tables": rel(results.glob("*")),               # tables, their long forms, metrics.json, reports
        "figure data": rel([*results.glob("plots/*"), *(p for p in (wf / "figures").rglob("*") if p.suffix in FIGURE_DATA)]),
        "model.pt": rel(results.glob("runs/**/model.pt")),
        "metrics.csv": rel(results.glob("runs/**/metrics.csv")),
    }


def same_model(a: Path, b: Path) -> bool:
    import torch

    from refilled.io import load_tensors

    x, y = load_tensors(a), load_tensors(b)
    if x.keys() != y.keys():
        return False
    for key in x:
        if key == "state_dict":
            if x[key].keys() != y[key].keys() or not all(torch.equal(x[key][k], y[key][k]) for k in x[key]):
                return False
        elif x[key] != y[key]:
            return False
    return True


def compare(chaos: Path, reference: Path) -> list[str]:
    """What differs between the chaos run and the reference (empty: identical). Every file of
    the chaos run (its `all` finished, so it has all of them) must be in the reference; the
    reference may hold more, made by other targets (the test suite's smoke run also builds
    `claims`)."""
    problems = []
    mine, theirs = outputs(chaos), outputs(reference)
    for kind in mine:
        missing = sorted(set(mine[kind]) - set(theirs[kind]))
        if missing:
            problems.append(f"{kind}: not in the reference: {missing}")
        for rel in sorted(set(mine[kind]) & set(theirs[kind])):
            a, b = chaos / rel, reference / rel
            if kind == "model.pt":
                same = same_model(a, b)
            elif kind == "metrics.csv":
                drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
                same = drop(read_rows(a)) == drop(read_rows(b))
            else:
                same = a.read_bytes() == b.read_bytes()
            if not same:
                problems.append(f"{kind}: {rel} differs")
    return problems


def chaos_run(wf: Workflow, finished: FinishedRuns, kills: int, rng: random.Random, gap: tuple[float, float],
              grace: float, say) -> dict:
    """Start the workflow, kill it `kills` times, resume it after each, let it finish."""
    counts: collections.Counter = collections.Counter()
    term_outcome: collections.Counter = collections.Counter()
    resumes = 0
    extra: tuple[str, ...] = ()                     # the flags of the command that was running
    # each kill's (delay, kind, which job) is drawn once, so the sequence of kinds depends on the seed alone
    draw = lambda: (rng.uniform(*gap), rng.choice(KINDS), rng.random()) if sum(counts.values()) < kills else None
    plan = draw()
    wf.start()
    since = time.monotonic()                        # the delay counts from the latest start or kill
    killed_since_start = False
    while True:
        victim, looked = None, 0.0
        while True:
            if time.monotonic() - looked > 1:
                finished.look()
                looked = time.monotonic()
            rc = wf.proc.poll()
            if rc is not None:
                break
            if plan is not None and time.monotonic() >= since + plan[0]:
                if plan[1] == "snakemake":
                    break
                jobs = wf.training_jobs()
                if jobs:
                    victim = jobs[int(plan[2] * len(jobs))]
                    break
            time.sleep(0.05)
        finished.look()
        if rc is not None:
            if rc == 0:
                return {"kills": counts, "resumes": resumes, "term": term_outcome, "finished_early": plan is not None}
            if not killed_since_start:
                raise RuntimeError(f"snakemake failed ({rc}) with no kill since it started; see {wf.log.name}")
            resumes += 1                             # a job died and Snakemake stopped: the same command again
            say(f"resume {resumes}: snakemake exited {rc} after a job's death; the same command again")
            wf.start(*extra)
            since, killed_since_start = time.monotonic(), False
            continue
        kind = plan[1]
        n = sum(counts.values()) + 1
        if kind == "snakemake":
            wf.kill_all()
            say(f"kill {n}: snakemake (SIGKILL to its process group)")
        elif kind == "job":
            _signal(victim, signal.SIGKILL)
            say(f"kill {n}: job {victim} (SIGKILL)")
        else:
            _signal(victim, signal.SIGTERM)
            end = time.monotonic() + grace
            while _alive(victim) and time.monotonic() < end:
                time.sleep(0.02)
            outcome = "needed SIGKILL" if _alive(victim) else "exited on SIGTERM"
            _signal(victim, signal.SIGKILL)
            term_outcome[outcome] += 1
            say(f"kill {n}: job {victim} (SIGTERM, {grace:g} s grace: {outcome})")
        counts[kind] += 1
        plan = draw()
        since, killed_since_start = time.monotonic(), True
        if kind == "snakemake":
            finished.look()
            wf.unlock()
            extra = ("--rerun-incomplete",)
            resumes += 1
            say(f"resume {resumes}: snakemake --unlock, then --rerun-incomplete")
            wf.start(*extra)
            since, killed_since_start = time.monotonic(), False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="kills before the run is let finish (default 20)")
    p.add_argument("--seed", type=int, default=None, help="draws the moments, kinds and victims (default: drawn, printed)")
    p.add_argument("--reference", type=Path, default=None,
                   help="a directory where `snakemake all` of the profile finished, never interrupted (default: run one)")
    p.add_argument("--workdir", type=Path, default=None, help="where the chaos run goes (default: a new temp dir); must not exist")
    p.add_argument("--profile", default="smoke", help="the config profile (default smoke)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    # the smoke workflow runs in about 30 s on 2 cores (5 Dec 2026, fork server): 20 kills need short gaps
    p.add_argument("--gap", type=float, nargs=2, default=(1.0, 6.0), metavar=("MIN", "MAX"),
                   help="seconds from a start of Snakemake to the next kill, drawn uniformly (default 1 6)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    args = p.parse_args(argv)
    if args.kills < 0:
        p.error(f"--kills must be >= 0, got {args.kills}")
    if not 0 <= args.gap[0] <= args.gap[1]:
        p.error(f"--gap needs 0 <= MIN <= MAX, got {args.gap[0]:g} {args.gap[1]:g}")
    if args.grace < 0:
        p.error(f"--grace must be >= 0, got {args.grace:g}")
    if args.reference is not None and not (args.reference / "results").is_dir():
        p.error(f"--reference {args.reference}: no results/ there (a finished run of `snakemake all` is needed)")
    if not (ROOT / "data" / "raw" / "fashion-mnist").is_dir():
        p.error(f"{ROOT / 'data' / 'raw' / 'fashion-mnist'} is missing: obtain Fashion-MNIST first (make data)")
    if args.workdir is not None and args.workdir.exists():
        p.error(f"--workdir {args.workdir} exists; give a new directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    workdir = args.workdir or Path(__import__("tempfile").mkdtemp(prefix="refilled-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    say(f"chaos run: profile {args.profile}, {args.kills} kills, seed {seed}, in {workdir}")

    reference = args.reference
    if reference is None:
        reference = copy_workflow(workdir / "reference" / "wf")
        ref = Workflow(reference, args.cores, args.profile, workdir / "reference" / "epochs.log")
        began = time.monotonic()
        ref.start()
        if ref.proc.wait() != 0:
            say(f"the reference run failed; see {ref.log.name}")
            return 1
        say(f"reference run: {time.monotonic() - began:.0f} s")

    chaos_wf = copy_workflow(workdir / "chaos" / "wf")
    epoch_log = workdir / "chaos" / "epochs.log"
    epoch_log.touch()
    wf = Workflow(chaos_wf, args.cores, args.profile, epoch_log)
    finished = FinishedRuns(chaos_wf, epoch_log)
    began = time.monotonic()
    try:
        run = chaos_run(wf, finished, args.kills, random.Random(seed), tuple(args.gap), args.grace, say)
    except RuntimeError as exc:      # the workflow failed on its own, or a kill left something behind
        say(f"result: FAILED after {time.monotonic() - began:.0f} s: {exc}")
        return 1
    finally:
        if wf.proc is not None and wf.proc.poll() is None:
            wf.kill_all()
    seconds = time.monotonic() - began
    finished.look()

    sys.path.insert(0, str(ROOT / "src"))
    problems = compare(chaos_wf, reference)
    retrained = finished.retrained()
    trained = sum(1 for _ in open(epoch_log, "rb"))
    beyond = trained - epochs_in(reference / "results" / "runs")
    kills = run["kills"]
    files = {kind: len(paths) for kind, paths in outputs(chaos_wf).items()}

    print()
    print(f"seed {seed}; {sum(kills.values())} kills: " + ", ".join(f"{k} {kills[k]}" for k in KINDS))
    if kills["job-term"]:
        print("  SIGTERM'd jobs: " + ", ".join(f"{k} {v}" for k, v in sorted(run["term"].items())))
    print(f"resumes: {run['resumes']}")
    print(f"runs retrained after their summary.json: {len(retrained)}"
          + (f" ({', '.join(retrained)})" if retrained else ""))
    print(f"epochs trained: {trained}, beyond the uninterrupted run's: {beyond}")
    print(f"compared: " + ", ".join(f"{n} {kind}" for kind, n in files.items()))
    print(f"wall time of the chaos run: {seconds:.0f} s")
    if run["finished_early"]:
        problems.append(f"the workflow finished after {sum(kills.values())} of {args.kills} kills (shorten --gap)")
    for problem in problems:
        print(f"DIFFERS: {problem}")
    ok = not problems and not retrained
    print("result: " + ("identical outputs, no finished run trained again" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
