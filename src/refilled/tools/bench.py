"""`refilled bench`: our training step against a reference-style pipeline, in one process.

Reference style (what a straightforward implementation of the paper does):
- data: a `DataLoader` with worker processes running per-sample torchvision PIL transforms
  (32 px: RandomCrop(32, padding=4) + flip; 224 px: JPEG decode + RandomResizedCrop +
  flip), ToTensor, Normalize, pinned memory;
- fp32, NCHW, `torch.optim.SGD` (Nesterov) with its default implementation, eager,
  and ``loss.item()`` every step (the per-step logging such loops do);
- stage 1: semi-hard triplets mined, then grouped into tuples by a Python loop over the
  triplets and padded into index matrices (`reference_tuple_loss`, the structure of the
  authors' code; it computes the same loss as `refilled.losses.comparison_matching_loss`,
  see tests/test_bench.py).

Ours: the code the runs use. uint8 images on the device augmented batch-wise
(`refilled.data.batches.Batches`; 224 px: `refilled.data.augment.CachedImageBatches` on a
decoded-once cache), bf16 autocast, channels-last, fused SGD with a tensor lr, the whole
step captured in a CUDA graph (`refilled.training.step.TrainStep`), the dense stage-1 loss.

Rows: teacher training (CE), stage 1 and stage 2 for WRN-(40,2) and WRN-(16,1) students
(WRN-(40,2) teacher, 32 px) and MobileNet-1.0 at 224 px (MobileNet-1.0 teacher); on a
CPU-only machine a small configuration (batch 16, a few steps, WRN-(16,1) and
MobileNet-0.25 at 64 px). Columns: images per second of both, ratio ours / reference,
ours against our CE step of the same student (``vs_ce``), the teacher forward's share of
our step (stage rows), FLOPs per image of a training step (counted with
`torch.utils.flop_counter.FlopCounterMode`: convolutions and matrix products, forward and
backward), achieved TFLOP/s and their share of the GPU's dense bf16 peak ('n/a' where the
peak is unknown, e.g. on a CPU). ``--concurrent 1 2 4`` adds rows with the aggregate
images per second of N processes training at once on the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from refilled.io import write_csv
from refilled.tools.bench_cases import (TARGET_METHODS, TARGET_STUDENTS, Case, Config, _Data, bench_methods,
                                         failure_note, full_config, is_target, peak_bf16_tflops, plan_seconds,
                                         small_config)
from refilled.tools.bench_concurrent import _child, concurrent_rows
from refilled.tools.bench_ours import run_ours
from refilled.tools.bench_reference import run_reference


COLUMNS = ["method", "student", "teacher", "px", "batch", "jobs", "ref_img_s", "ours_img_s", "ratio",
           "ours_eager_img_s", "vs_ce", "vs_one_job", "teacher_share", "gflop_per_img", "tflops", "peak_share",
           "device", "notes"]


def _fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def bench_rows(cfg: Config, device: torch.device, reference: bool = True, eager: bool | None = None,
               workdir: Path | None = None, log=print, on_row=None, earlier: list[dict] | None = None) -> list[dict]:
    """One row per case of `cfg`, each passed to `on_row(row)` the moment it is measured (a
    time limit keeps the finished rows). A row that fails (an exception, a non-finite loss)
    says so in its notes and the next row runs. `earlier`: rows measured before (another
    call), where `vs_ce` finds its CE row too."""
    eager = device.type == "cuda" if eager is None else eager
    if device.type == "cuda":   # for both pipelines, so that neither row depends on which ran first
        torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    known = list(earlier or [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="refilled-bench-") as tmp:
        data = _Data(cfg, Path(workdir or tmp))
        for case in cfg.cases:
            row = {"method": case.method, "student": case.student, "teacher": case.teacher or "", "px": case.px,
                   "batch": case.batch, "jobs": 1, "device": dev_name}
            try:
                _measure_row(row, case, cfg, data, device, reference, eager, known)
            except Exception as exc:   # this row's failure, reported in it; the next row runs
                row["notes"] = failure_note(exc)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            known.append(row)
            log(f"  {case.method:8s} {case.student:15s} {case.px:4d}px: ours {row.get('ours_img_s') or '-'} img/s, "
                f"reference {row.get('ref_img_s') or '-'} img/s{'  ' + row['notes'] if row['notes'] else ''}")
            if on_row:
                on_row(row)
    return rows


def _measure_row(row: dict, case: Case, cfg: Config, data, device: torch.device, reference: bool, eager: bool,
                 known: list[dict]) -> None:
    from refilled.training.step import NonFiniteLoss

    notes = []
    ref = None
    if reference:
        try:
            ref = run_reference(case, cfg, data, device)
        except ImportError as exc:   # torchvision missing: no PIL reference
            notes.append(f"no reference ({exc.name} missing)")
    try:
        ours = run_ours(case, cfg, data, device)
    except NonFiniteLoss as exc:
        raise FloatingPointError(f"non-finite loss ({exc})") from None
    notes += _step_notes(ours["steps"], device)
    row["ref_img_s"] = round(ref, 1) if ref else ""
    row["ours_img_s"] = round(ours["img_s"], 1)
    row["ratio"] = round(row["ours_img_s"] / row["ref_img_s"], 3) if ref else ""
    if eager and ours["steps"]["graph_steps"]:
        row["ours_eager_img_s"] = round(run_ours(case, cfg, data, device, graph="off", with_extras=False)["img_s"], 1)
    if "teacher_s" in ours:
        row["teacher_share"] = round(ours["teacher_s"] * ours["img_s"] / case.batch, 3)
    peak = peak_bf16_tflops(device)
    if ours["flops"] is None:
        notes.append("FLOPs not counted (FlopCounterMode cannot trace autograd.grad)")
        row["gflop_per_img"] = row["tflops"] = row["peak_share"] = "n/a"
    else:
        gflop = ours["flops"] / 1e9
        row["gflop_per_img"] = round(gflop, 4)
        tflops = gflop * ours["img_s"] / 1e3
        row["tflops"] = round(tflops, 3)
        row["peak_share"] = round(tflops / peak, 4) if peak else "n/a"
    ce_method = bench_methods()[0]
    ce = [r for r in known if r["method"] == ce_method and r["student"] == case.student
          and str(r["px"]) == str(case.px) and str(r["jobs"]) == "1" and r.get("ours_img_s") not in (None, "")]
    if ce and case.method != ce_method:   # ours against our CE step of the same student at the same size
        row["vs_ce"] = round(row["ours_img_s"] / float(ce[-1]["ours_img_s"]), 3)
    row["notes"] = "; ".join(notes)


def _step_notes(record: dict, device: torch.device) -> list[str]:
    """What a row must say about how its timed steps ran, where it is not the plain graph."""
    if record["requested"] == "off" or record["mode"] == "graph":
        return []
    if record["capture_failures"]:
        return [f"graph capture failed: eager ({record.get('capture_disabled', '')})"]
    if record.get("capture_disabled"):
        return ["eager: graph capture is off in this process after an earlier failure"]
    return [f"steps ran as {record['mode']} ({record['fallbacks']} eager fallbacks)"]


TABLE = [("method", "method", 14), ("student", "student", 15), ("teacher", "teacher", 15), ("px", "px", 4),
         ("batch", "batch", 5), ("jobs", "jobs", 4), ("ref_img_s", "ref img/s", 10), ("ours_img_s", "ours img/s", 10),
         ("ratio", "ours/ref", 8), ("ours_eager_img_s", "eager img/s", 11), ("vs_ce", "vs CE", 6),
         ("vs_one_job", "vs 1 job", 8), ("teacher_share", "teacher", 7), ("gflop_per_img", "GFLOP/img", 9),
         ("tflops", "TFLOP/s", 8), ("peak_share", "bf16 peak", 9)]


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(title.rjust(w) for _, title, w in TABLE)]
    for r in rows:
        cells = []
        for key, _, w in TABLE:
            v = r.get(key, "")
            if key == "peak_share" and isinstance(v, float):
                v = f"{100 * v:.1f}%"
            cells.append(_fmt(v).rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def run_bench(args) -> list[dict]:
    from refilled.training.loop import resolve_device

    device = resolve_device(args.device)
    config = args.config if args.config != "auto" else ("full" if device.type == "cuda" else "small")
    cfg = full_config() if config == "full" else small_config()
    if args.seconds is not None:
        cfg.seconds = args.seconds
    if args.steps is not None:
        cfg.min_steps = args.steps
    if args.methods:
        cfg.cases = [c for c in cfg.cases if c.method in args.methods]
    if args.archs:
        cfg.cases = [c for c in cfg.cases if c.student in args.archs]
    if args.part != "all":
        cfg.cases = [c for c in cfg.cases if is_target(c) == (args.part == "targets")]
    if args.workers is not None:
        cfg.workers = args.workers
    eager = None if args.eager is None else args.eager == "yes"
    jobs_list = list(args.concurrent or [])
    conc_seconds = args.concurrent_seconds
    if conc_seconds is None:
        conc_seconds = 3.0 if config == "full" else 0.5
    earlier = _read_rows(args.out) if args.append and args.out and Path(args.out).exists() else []
    measured = {_row_key(r) for r in earlier if r.get("ours_img_s") not in (None, "")}
    earlier = [r for r in earlier if _row_key(r) in measured]   # a failed row is measured again, not kept twice
    cfg.cases = [c for c in cfg.cases if (c.method, c.student, str(c.px), "1") not in measured]
    base = Case(bench_methods()[0], args.concurrent_arch or "wrn-16-1", None, 32, cfg.batch,
                50 if config == "full" else 8)
    jobs_list = [j for j in jobs_list if (f"{base.method} (concurrent)", base.student, "32", str(j)) not in measured]
    if args.plan:
        cuda = device.type == "cuda"
        timed, estimate = plan_seconds(cfg, cuda, not args.no_reference, cuda if eager is None else eager,
                                       len(jobs_list), conc_seconds)
        print(f"plan: {len(cfg.cases)} rows and {len(jobs_list)} concurrency rounds; timed {timed:.1f} s at least, "
              f"estimated {estimate:.0f} s in all (a guess, not measured)")
        return []
    print(f"refilled bench: {config} configuration on {device} (torch {torch.__version__}); "
          f"reference = per-sample PIL DataLoader ({cfg.workers} workers), fp32, eager"
          "; a method's reference_loss where it has one (stage 1: the Python tuple loop)", flush=True)
    rows = list(earlier)

    def save(row):   # every row the moment it is measured: a time limit keeps the finished ones
        for c in COLUMNS:
            row.setdefault(c, "")
        rows.append(row)
        if args.out:
            write_csv(args.out, [{c: r.get(c, "") for c in COLUMNS} for r in rows], COLUMNS)

    log = lambda s: print(s, flush=True)
    bench_rows(cfg, device, reference=not args.no_reference, eager=eager, log=log, on_row=save, earlier=earlier)
    if jobs_list:
        in_process = [r for r in rows if r["method"] == base.method and r["student"] == base.student
                      and str(r["px"]) == "32" and str(r["jobs"]) == "1" and r.get("ours_img_s") not in (None, "")]
        one_job = (float(in_process[-1]["ours_img_s"]), "the in-process row") if in_process else None
        one_conc = [r for r in rows if r["method"] == f"{base.method} (concurrent)" and str(r["jobs"]) == "1"
                    and r.get("ours_img_s") not in (None, "")]
        if one_conc:
            one_job = (float(one_conc[-1]["ours_img_s"]), "")
        concurrent_rows(cfg, device, jobs_list, base, conc_seconds, log=log, on_row=save, one_job=one_job)
    print(format_table(rows))
    if args.out:
        print(f"wrote {args.out}")
    return rows


def _row_key(row: dict) -> tuple[str, str, str, str]:
    return row["method"], row["student"], str(row["px"]), str(row["jobs"])


def _read_rows(path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and list(rows[0]) != COLUMNS:
        print(f"refilled bench: {path} has other columns than this version writes; choose another --out "
              "or drop --append", file=sys.stderr)
        raise SystemExit(2)
    return rows


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--config", choices=("auto", "full", "small"), default="auto",
                   help="full: batch 128 (64 at 224 px), WRN-(40,2), WRN-(16,1), MobileNet-1.0 at 224 px; small: "
                        "batch 16, a few steps, WRN-(16,1) and MobileNet-0.25 at 64 px (auto: full on CUDA)")
    from refilled.methods import CATALOG

    p.add_argument("--methods", nargs="+", choices=list(CATALOG), help="only the rows of these catalog methods")
    p.add_argument("--archs", nargs="+", help="only these students")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (at least)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (at least)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the reference pipeline")
    p.add_argument("--no-reference", action="store_true", help="measure only our pipeline")
    p.add_argument("--eager", choices=("yes", "no"), default=None,
                   help="also time our step without the CUDA graph (default: yes on CUDA)")
    p.add_argument("--concurrent", type=int, nargs="+", default=None, metavar="N",
                   help="add aggregate img/s rows for N concurrent jobs on the device, e.g. 1 2 4")
    p.add_argument("--concurrent-arch", default=None, help="student of the concurrent jobs (default wrn-16-1)")
    p.add_argument("--concurrent-seconds", type=float, default=None, help="timed seconds of each concurrent job")
    p.add_argument("--out", type=Path, default=Path("bench.csv"), help="CSV path (default bench.csv)")
    p.add_argument("--part", choices=("all", "targets", "rest"), default="all",
                   help="targets: only the README's target rows (" + ", ".join(TARGET_METHODS) + " for "
                        + " and ".join(TARGET_STUDENTS) + "); rest: every other row")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out and measure only those not there yet")
    p.add_argument("--plan", action="store_true",
                   help="print the timed seconds (at least) and estimated seconds of this selection; measure nothing")


def cmd_bench(args) -> int:
    """0, or 1 where a row failed (its notes say how; --append drops earlier failed rows)."""
    rows = run_bench(args)
    return 1 if any(r.get("ours_img_s") in (None, "") for r in rows) else 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `refilled bench` on the CLI's subparsers (the caller wires it in)."""
    p = subparsers.add_parser(
        "bench", help="images/s of our training step against a reference-style pipeline",
        description="Teacher training, stage 1 and stage 2: our pipeline (uint8 data on the device, batched "
                    "augmentation, bf16, channels-last, fused SGD, CUDA graph) against a reference-style one "
                    "(per-sample PIL DataLoader with workers, fp32, eager; stage 1 as a Python tuple loop), in one "
                    "process. Prints a table (img/s, ratio, share of the GPU's bf16 peak) and writes it as CSV. "
                    "On a CPU-only machine it runs a small configuration.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog="refilled bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
