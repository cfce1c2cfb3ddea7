"""`refilled plan`: what a profile's targets cost before they run, in a few seconds, without torch.

From the profile (`refilled.experiments.profile.load_profile`) and the runs its targets need
(`refilled.experiments.grid`, the workflow's own enumeration), per training run: its images per epoch
(the profile's per-class counts, the dataset's, the split's h classes, the held-out
validation images), its SGD steps (the training loader drops the last partial batch:
`refilled.data.batches.Batches`), the images it processes, its FLOPs (the committed table
`refilled/tools/flops.csv`: the student's forward and backward, plus the teacher's forward where
the method reads a teacher; evaluations as forward passes) and its model.pt's size. Time
follows from measured rates: FLOPs per second of `refilled bench` rows (a bench.csv given
with --bench, else the CPU rows measured on this repository's 2-core machine that ship with
the package, `plan_cpu_bench.csv`), plus a fixed cost per job (start-up, data, teacher,
writing). Not counted: the methods' own loss arithmetic (RKD's angles, stage 1's mining,
Jacobian matching's double backward), the jobs that train nothing (splits, tables, figures).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from refilled.experiments.profile import load_profile, load_yaml
from refilled.tools.flops import TABLE as FLOPS_TABLE
from refilled.tools.flops import Costs, load_table
from refilled.experiments.grid import Run, figure1_runs, runs_for
from refilled.methods import CATALOG


class PlanError(ValueError):
    """Bad input to `refilled plan` (a bench.csv, a flag); the message names it."""


@dataclass(frozen=True)
class DatasetSize:
    train_per_class: float   # images per class of the official training split (CUB: the mean, 29 or 30 each)
    test_per_class: float
    px: int                  # the side of the images the networks see
    classes: int


# The official releases (refilled.data.check.OFFICIAL_COUNTS, divided by the classes); a test keeps them equal.
DATASETS = {
    "fashion-mnist": DatasetSize(6000, 1000, 32, 10),
    "cifar100": DatasetSize(500, 100, 32, 100),
    "cub200": DatasetSize(5994 / 200, 5794 / 200, 224, 200),
}
CUB_CACHE_PX = 256   # refilled.data.augment: CUB decoded once at 256 x 256 (uint8, 3 channels) on CUDA

# The CPU rates used without --bench: `refilled bench` rows of this repository's 2-core machine.
DEFAULT_CPU_BENCH = Path(__file__).with_name("plan_cpu_bench.csv")
DEFAULT_CPU_BENCH_SOURCE = ("plan_cpu_bench.csv: WRN-(16,1) steps at batch 16 measured with nothing else running "
                            "(README, 2 Dec 2026; 2 threads assumed, torch's default here, the README does not say), "
                            "MobileNet-0.25 steps measured on 4 Dec 2026 under load and scaled by the WRN-(16,1) CE "
                            "step's ratio of the two")
# Fixed cost of one job beyond its FLOPs (start-up, data, teacher, writing; evaluation is in the
# FLOPs): measured by the phases of `make demo` from a fresh clone with the fork server, nothing
# else running, 5 Dec 2026 (scripts/job_phases.py: 0.53 s a job over 342 training jobs; a job's
# shell and `refilled` client add about 0.14 s more, Snakemake's benchmark files against the
# phases' totals). Without the fork server (a cluster, `--config forkserver=off`) a job pays
# 3-4 s more, importing torch.
DEFAULT_OVERHEAD_S = 0.7
DEFAULT_OVERHEAD_SOURCE = "start-up, data, teacher and writing of the demo's jobs with the fork server, 5 Dec 2026"

CSV_COLUMNS = ["method", "arch", "px", "runs", "steps", "images", "train_flops", "eval_flops",
               "fwd_flops_per_image", "train_flops_per_image", "checkpoint_bytes", "cpu_seconds", "gpu_seconds"]


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------

def steps_per_epoch(n_images: int, batch: int) -> int:
    """SGD steps of one epoch: the loader drops the last partial batch, unless there is only one."""
    return n_images // batch if n_images >= batch else math.ceil(n_images / batch)


def run_plan(cfg: dict, run: Run, table: dict, figure1: set[str] | None = None) -> dict:
    """Images, steps, FLOPs and checkpoint bytes of one run of profile `cfg`."""
    exp = cfg["experiments"][run.exp]
    data = DATASETS[exp["dataset"]]
    h = exp["classes_per_task"]
    test_n = round(h * (cfg["test_per_class"] or data.test_per_class))
    pool = cfg["train_per_class"] or data.train_per_class
    if run.kind == "teacher":
        recipe, per_class, val, epochs = exp["teacher"], exp["teacher"]["per_class"], 0, exp["teacher"]["epochs"]
    else:
        recipe, per_class, val = exp, exp["per_class"], exp.get("val_per_class") or 0
        epochs = exp[CATALOG[run.method].epochs] if run.kind == "student" else 0
    available = pool - val
    n_train = round(h * min(per_class or available, available))
    batch = recipe.get("batch_size", cfg["batch_size"])
    student = Costs(table, run.arch, data.px, h)
    teacher_arch = exp["teacher"]["arch"]
    teacher = Costs(table, teacher_arch, data.px, h)

    if run.kind == "reference":     # teacher and student forward over a balanced test set of C' and C
        eval_flops = 2 * test_n * (student.fwd + teacher.fwd)
        return _row(run, data.px, 0, 0, 0, 0, eval_flops, 0, student.fwd)
    if run.kind == "teacher_ncm":   # the teacher's embedding over the student's training and test images
        return _row(run, data.px, 0, 0, 0, 0, (n_train + test_n) * teacher.fwd, 0, teacher.fwd)

    per_epoch = steps_per_epoch(n_train, batch)
    steps = epochs * per_epoch
    images = epochs * min(n_train, per_epoch * batch)
    reads_teacher = run.kind == "student" and (CATALOG[run.method].teacher or run.joint)
    per_image = student.train + (teacher.fwd if reads_teacher else 0)
    # evaluations: every eval_every epochs and after the last; every epoch with a validation split
    # or for Figure 1's curves
    every = 1 if val or (figure1 and run.path in figure1) else cfg["eval_every"]
    n_evals = math.ceil(epochs / every)
    ncm = run.kind == "student" and CATALOG[run.method].scored_by == "ncm_acc"
    per_eval = test_n + h * val + (n_train if ncm else 0)
    final = n_train + test_n if run.kind == "student" and not ncm else 0   # the finished run's NCM accuracy
    eval_flops = (n_evals * per_eval + final) * student.fwd
    return _row(run, data.px, 1, steps, images, images * per_image, eval_flops, student.checkpoint_bytes, student.fwd)


def _row(run: Run, px: int, trains: int, steps: int, images: int, train_flops: int, eval_flops: int,
         checkpoint_bytes: int, fwd_per_image: int) -> dict:
    method = "teacher" if run.kind == "teacher" else run.method + (" (joint)" if run.joint else "")
    return {"run": run, "method": method, "arch": run.arch, "px": px, "trains": trains, "steps": steps,
            "images": images, "train_flops": train_flops, "eval_flops": eval_flops,
            "checkpoint_bytes": checkpoint_bytes, "fwd_flops_per_image": fwd_per_image}


# ---------------------------------------------------------------------------------------
# Rates: FLOPs per second from `refilled bench` rows
# ---------------------------------------------------------------------------------------

def arch_family(arch: str) -> str:
    return arch.split("-")[0]


BENCH_CLASSES = 10   # the head's share of a step's FLOPs is below 0.1 %: any class count will do


class Rates:
    """FLOPs per second of one device from `refilled bench` rows: each row's images per second
    times its step's FLOPs per image as `refilled plan` counts them (the student's forward and
    backward, the teacher's forward: flops.csv), so that what the plan does not count (the
    methods' own loss arithmetic) is in the rate. A run takes the median over the rows of its
    student and size, else of its family (wrn, mobilenet) and size, else of its family, else
    of every row. On a CPU, a job pinned to fewer cores than the bench used (`refilled bench`
    writes "cpu (N threads)") gets that fraction of the rate: linear in the cores, which
    overstates what a second core adds, so it errs towards a longer estimate."""

    def __init__(self, points: list[tuple[str, int, float]], device: str, source: str):
        self.points, self.device, self.source = points, device, source
        found = re.search(r"\((\d+) threads?\)", device) if device.startswith("cpu") else None
        self.threads = int(found[1]) if found else None

    def flops_per_s(self, arch: str, px: int, threads: int | None = None) -> float:
        share = min(threads, self.threads) / self.threads if threads and self.threads else 1.0
        for keep in (lambda a, p: a == arch and p == px,
                     lambda a, p: arch_family(a) == arch_family(arch) and p == px,
                     lambda a, p: arch_family(a) == arch_family(arch),
                     lambda a, p: True):
            chosen = [f for a, p, f in self.points if keep(a, p)]
            if chosen:
                return share * statistics.median(chosen)
        raise AssertionError("Rates without rows")   # read_bench refuses a file without usable rows


def read_bench(path: Path, table: dict) -> dict[str, Rates]:
    """device -> Rates, from a `refilled bench --out` CSV (its single-job rows)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"method", "student", "teacher", "px", "jobs", "ours_img_s", "device"} - set(reader.fieldnames or ())
            if missing:
                raise PlanError(f"{path}: not a `refilled bench --out` CSV: missing column(s) {', '.join(sorted(missing))}")
            rows = list(reader)
    except FileNotFoundError:
        raise PlanError(f"bench file not found: {path}") from None
    points: dict[str, list] = {}
    for i, r in enumerate(rows, start=2):
        if str(r["jobs"]).strip() not in ("", "1"):   # the concurrent-jobs rows
            continue
        try:
            img_s, px = float(r["ours_img_s"]), int(r["px"])
            if img_s <= 0:
                raise ValueError
        except ValueError:
            raise PlanError(f"{path}, line {i}: ours_img_s {r['ours_img_s']!r}, px {r['px']!r}: expected a positive "
                            "number and an integer") from None
        per_image = Costs(table, r["student"], px, BENCH_CLASSES).train
        if r["teacher"]:
            per_image += Costs(table, r["teacher"], px, BENCH_CLASSES).fwd
        points.setdefault(r["device"], []).append((r["student"], px, img_s * per_image))
    if not points:
        raise PlanError(f"{path}: no single-job row")
    return {device: Rates(p, device, str(path)) for device, p in points.items()}


def device_rates(bench_files: list[Path], table: dict) -> tuple[Rates, Rates | None]:
    """(CPU rates, GPU rates or None): the bench files' rows, the CPU from the shipped default
    where no file has CPU rows."""
    cpu = gpu = None
    for path in bench_files:
        for device, rates in read_bench(path, table).items():
            if device.startswith("cpu"):
                cpu = cpu or rates
            else:
                gpu = gpu or rates
    if cpu is None:
        cpu = next(iter(read_bench(DEFAULT_CPU_BENCH, table).values()))
        cpu.source = DEFAULT_CPU_BENCH_SOURCE
    return cpu, gpu


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

def wall_seconds(rows: list[dict], seconds: list[float], slots: int, cfg: dict) -> float:
    """Makespan of the jobs on `slots` parallel slots: whenever a slot is free it takes the first
    job, in the workflow's order, whose inputs (the runs it reads) have finished."""
    from refilled.experiments.grid import needs

    index = {f"{r['run'].kind}:{r['run'].path}": i for i, r in enumerate(rows)}
    waiting = [0] * len(rows)                  # unfinished inputs per job
    readers: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(rows):
        for d in needs(cfg, r["run"]):
            waiting[i] += 1
            readers[index[f"{d.kind}:{d.path}"]].append(i)
    ready = [i for i in range(len(rows)) if waiting[i] == 0]
    heapq.heapify(ready)
    running: list[tuple[float, int]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < slots:
            i = heapq.heappop(ready)
            heapq.heappush(running, (now + seconds[i], i))
        now, i = heapq.heappop(running)
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    return now


def build_plan(root: Path, profile: str, targets: list[str], bench_files: list[Path], cores: int,
               overhead_s: float, flops_table: Path = FLOPS_TABLE) -> dict:
    cfg = load_profile(root, profile)
    table = load_table(flops_table)
    runs = runs_for(cfg, targets, profile)
    figure1 = {r.path for r in figure1_runs(cfg)}
    rows = [run_plan(cfg, r, table, figure1) for r in runs]
    cpu, gpu = device_rates(bench_files, table)
    for r in rows:
        flops = r["train_flops"] + r["eval_flops"]
        r["cpu_seconds"] = overhead_s + flops / cpu.flops_per_s(r["arch"], r["px"], int(cfg["threads"]))
        r["gpu_seconds"] = flops / gpu.flops_per_s(r["arch"], r["px"]) if gpu else None
    slots = max(1, cores // int(cfg["threads"]))
    data = _data_bytes(cfg)
    return {"profile": profile, "targets": targets or ["all"], "rows": rows, "groups": group(rows), "cpu": cpu,
            "gpu": gpu, "cores": cores, "slots": slots, "threads": int(cfg["threads"]), "overhead_s": overhead_s,
            "cpu_wall_s": wall_seconds(rows, [r["cpu_seconds"] for r in rows], slots, cfg), **data}


def _data_bytes(cfg: dict) -> dict:
    """The data rule's prepared subsample (IDX files, small profiles) and CUB's decoded cache (CUDA)."""
    datasets = {e["dataset"] for e in cfg["experiments"].values()}
    prepared = 0
    if cfg["train_per_class"] or cfg["test_per_class"]:
        for name in datasets:
            d = DATASETS[name]
            images = d.classes * ((cfg["train_per_class"] or d.train_per_class) + (cfg["test_per_class"] or d.test_per_class))
            prepared += round(images) * (28 * 28 + 1) + 2 * (16 + 8)   # pixels, labels, IDX headers
    cub = "cub200" in datasets
    cache = round((DATASETS["cub200"].train_per_class + DATASETS["cub200"].test_per_class) * 200) * 3 * CUB_CACHE_PX**2 if cub else 0
    return {"prepared_bytes": prepared, "cache_bytes": cache}


def _order(r: dict) -> tuple:
    kinds = ("teacher", "student", "reference", "teacher_ncm")
    methods = list(CATALOG)
    run = r["run"]
    return (kinds.index(run.kind), run.joint, methods.index(run.method) if run.method in methods else 0)


def group(rows: list[dict]) -> list[dict]:
    """One row per (method, architecture, input size): teachers, then the catalog's order."""
    groups: dict[tuple, dict] = {}
    for r in sorted(rows, key=_order):   # stable: architectures in the profile's order
        key = (r["method"], r["arch"], r["px"])
        g = groups.setdefault(key, {"method": r["method"], "arch": r["arch"], "px": r["px"], "runs": 0, "steps": 0,
                                    "images": 0, "train_flops": 0, "eval_flops": 0, "checkpoint_bytes": 0,
                                    "cpu_seconds": 0.0, "gpu_seconds": 0.0 if r["gpu_seconds"] is not None else None})
        g["runs"] += 1
        g.setdefault("fwd", []).append(r["fwd_flops_per_image"])
        for k in ("steps", "images", "train_flops", "eval_flops", "checkpoint_bytes", "cpu_seconds"):
            g[k] += r[k]
        if g["gpu_seconds"] is not None:
            g["gpu_seconds"] += r["gpu_seconds"]
    for g in groups.values():   # per image: the mean over the group's runs (their classes may differ)
        g["fwd_flops_per_image"] = round(statistics.fmean(g.pop("fwd")))
        g["train_flops_per_image"] = round(g["train_flops"] / g["images"]) if g["images"] else 0
    return list(groups.values())


def total(groups: list[dict]) -> dict:
    t = {"method": "TOTAL", "arch": "", "px": "", "fwd_flops_per_image": "", "train_flops_per_image": ""}
    for k in ("runs", "steps", "images", "train_flops", "eval_flops", "checkpoint_bytes", "cpu_seconds"):
        t[k] = sum(g[k] for g in groups)
    gpu = [g["gpu_seconds"] for g in groups]
    t["gpu_seconds"] = None if any(v is None for v in gpu) else sum(gpu)
    return t


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

def _si(x: float, unit: str) -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _hours(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 100 * 3600:
        return f"{s / 3600:,.0f} h"
    return f"{s / 3600:.3g} h" if s >= 3600 else (f"{s / 60:.3g} min" if s >= 60 else f"{s:.3g} s")


def format_plan(plan: dict) -> str:
    groups = plan["groups"]
    rows = groups + [total(groups)]
    head = ["method", "arch", "px", "runs", "steps", "images", "fwd/img", "step/img", "train FLOPs", "eval FLOPs",
            "model.pt", "CPU time", "GPU time"]
    per_image = lambda v: _si(v, "FLOP") if v != "" else ""
    cells = [[str(r["method"]), str(r["arch"]), str(r["px"]), f"{r['runs']:,}", f"{r['steps']:,}", f"{r['images']:,}",
              per_image(r["fwd_flops_per_image"]), per_image(r["train_flops_per_image"]),
              _si(r["train_flops"], "FLOP"), _si(r["eval_flops"], "FLOP"), _si(r["checkpoint_bytes"], "B"),
              _hours(r["cpu_seconds"]), _hours(r["gpu_seconds"])] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda xs: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    trains = [r for r in plan["rows"] if r["trains"]]
    teachers = sum(r["method"] == "teacher" for r in trains)
    evals = len(plan["rows"]) - len(trains)
    cpu, gpu = plan["cpu"], plan["gpu"]
    out = [f"refilled plan: profile {plan['profile']}, targets {' '.join(plan['targets'])}: "
           f"{len(trains)} training jobs ({teachers} teacher{'s' * (teachers != 1)}, {len(trains) - teachers} student "
           f"run{'s' * (len(trains) - teachers != 1)})"
           + (f" and {evals} evaluation jobs (Table H references, teacher NCM)" if evals else ""),
           "", line(head), line(["-" * w for w in widths]), *[line(c) for c in cells], "",
           f"CPU time per job: {plan['overhead_s']:g} s fixed ({DEFAULT_OVERHEAD_SOURCE if plan['overhead_s'] == DEFAULT_OVERHEAD_S else '--overhead-s'})"
           f" + FLOPs / rate; rate from {cpu.source} ({cpu.device}"
           + (f", scaled to the profile's {plan['threads']} thread(s) a job" if cpu.threads and plan["threads"] < cpu.threads
              else "") + ").",
           f"CPU wall time on {plan['cores']} cores ({plan['slots']} jobs at once, the profile's threads per job), "
           f"in dependency order: {_hours(plan['cpu_wall_s'])} (the jobs that train nothing, a few seconds each, "
           "and Snakemake's own start are not included).",
           (f"GPU time: FLOPs / rate from {gpu.source} ({gpu.device}), training and evaluation only; a job's fixed "
            f"cost on a GPU (start-up, CUDA, data, writing) is not measured (on this CPU: {plan['overhead_s']:g} s a job)."
            if gpu else "GPU time: n/a: no GPU has been measured. Give --bench BENCH.csv, written by "
            "`refilled bench --out BENCH.csv` on the GPU."),
           f"Disk: model.pt files {_si(total(groups)['checkpoint_bytes'], 'B')} (metrics.csv and summary.json add a "
           f"few kB a run); prepared data {_si(plan['prepared_bytes'], 'B')}"
           + (f"; CUB decoded cache {_si(plan['cache_bytes'], 'B')} (CUDA runs, in ~/.cache/refilled)"
              if plan["cache_bytes"] else ""),
           "fwd/img: the student's forward pass; step/img: a training step's FLOPs per image (the student's forward "
           "and backward, plus the teacher's forward where the run reads one). Not counted: the methods' own loss "
           "arithmetic (RKD angles, stage-1 mining, Jacobian's double backward)."]
    return "\n".join(out)


def csv_rows(plan: dict) -> list[dict]:
    rows = plan["groups"] + [total(plan["groups"])]
    out = []
    for r in rows:
        row = {k: r[k] for k in CSV_COLUMNS}
        row["cpu_seconds"] = round(r["cpu_seconds"], 1)
        row["gpu_seconds"] = "" if r["gpu_seconds"] is None else round(r["gpu_seconds"], 1)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def default_profile(root: Path) -> str:
    params = root / "params.yaml"
    if params.is_file():
        return str((load_yaml(params) or {}).get("profile", "demo"))
    return "demo"


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="what a profile's targets cost: runs, SGD steps, images, FLOPs, CPU/GPU time, disk (no torch)",
        description="Count and cost the training runs that Snakemake TARGETs of a profile need (the workflow's "
                    "own run list, refilled.experiments.grid): per method and architecture the runs, SGD steps, images, FLOPs "
                    "(refilled/tools/flops.csv), model.pt bytes and the time on this CPU and on a GPU from measured "
                    "rates (refilled bench rows: --bench, else the CPU rows shipped with the package).")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="as for snakemake: all (default), teachers, students, tables, figures, claims, "
                        "results/table2.csv, figures/figure1_convergence.png, a run directory's file, ...")
    p.add_argument("--profile", default=None, help="config/PROFILE.yaml (default: params.yaml's profile)")
    p.add_argument("--root", type=Path, default=Path("."), help="the repository (config/, params.yaml; default .)")
    p.add_argument("--bench", type=Path, action="append", default=[], metavar="BENCH.csv",
                   help="a `refilled bench --out` file (repeat the flag for several): its CPU rows replace the "
                        "default CPU rates, its GPU rows give the GPU time")
    p.add_argument("--cores", type=int, default=2, help="cores of the machine that runs the jobs (default 2)")
    p.add_argument("--overhead-s", type=float, default=DEFAULT_OVERHEAD_S,
                   help=f"fixed seconds per job beyond its epochs (default {DEFAULT_OVERHEAD_S}: {DEFAULT_OVERHEAD_SOURCE})")
    p.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from refilled.io import write_csv

    if args.cores < 1:
        raise PlanError(f"--cores: {args.cores}: expected at least 1")
    if args.overhead_s < 0:
        raise PlanError(f"--overhead-s: {args.overhead_s}: expected a number >= 0")
    if not (args.root / "config").is_dir():
        raise PlanError(f"--root {args.root}: no config/ directory there (run in the repository or give --root)")
    profile = args.profile or default_profile(args.root)
    plan = build_plan(args.root, profile, args.targets, args.bench, args.cores, args.overhead_s)
    print(format_plan(plan))
    if args.out:
        write_csv(args.out, csv_rows(plan), CSV_COLUMNS)
        print(f"wrote {args.out}")
    return 0
