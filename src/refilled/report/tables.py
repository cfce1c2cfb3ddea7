"""Paper tables from run summaries (backs `refilled table` and `refilled lambda-auc`).

Every number comes from a `summary.json` written by a run; nothing is typed in. Tables 1
and 2 have the supplement's shape: one block per overlap ratio, the six methods as rows,
the student architectures as columns, cells "mean ± std" of the final-epoch test accuracy
in percent over seeds (sample std, n - 1; "n/a" with one seed). Table 4: overlap ratios
as rows, K-hat as columns, NCM accuracy after stage 1. Each table is written three ways:
the wide CSV, a long CSV (one row per run, with the path of its summary) and Markdown.
Table 3 (standard KD, teacher and student on every class) is Tables 1/2's shape for its one
ratio, the teacher's own test accuracy (mean ± std over its seeds) in the caption.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Iterable

from refilled.experiments.profile import fmt
from refilled.io import atomic_write_text, read_json, write_csv
from refilled.methods import CATALOG, ParamError, get, table_methods
from refilled.methods.catalog import applies

NOT_APPLICABLE = "—"   # a method that does not apply to a cell's label spaces (KD when the classes differ)
KHAT_LABELS = {"1": "1 (triplet)", "5": "5", "inf": "inf (tuple)"}


class TableError(ValueError):
    pass


def _ratio_key(r: float) -> str:
    return fmt(round(float(r), 6))


def cell(values: list[float]) -> str:
    """'mean ± std' with two decimals; sample std over seeds, 'n/a' for a single seed."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± n/a"


def parse_cell(text: str) -> tuple[float, float | None]:
    mean, _, std = text.partition(" ± ")
    return float(mean), (None if std.strip() in ("n/a", "") else float(std))


def _k_hat_key(k) -> str:
    return "inf" if k is None or (isinstance(k, float) and math.isinf(k)) or k == "inf" else str(int(k))


def _record(path: Path, table: str) -> dict:
    try:
        s = read_json(path)
    except FileNotFoundError:
        raise TableError(f"{path}: no such summary (did the run finish?)") from None
    ratio = _ratio_key(s["split"]["ratio"])
    method = s.get("method")
    scored_by = CATALOG[method].scored_by if method in CATALOG else None
    if table == "4":
        if scored_by != "ncm_acc":
            raise TableError(f"{path}: Table 4 needs stage-1 (NCM-scored) runs, this is a {method} run "
                             f"on the {s.get('task')} task")
        return {"ratio": ratio, "column": _k_hat_key(s["params"].get("k_hat")), "row": ratio, "arch": s["arch"],
                "seed": s["seed"], "value": 100.0 * s["ncm_acc"], "summary": str(path), **_val_selected(s)}
    if scored_by != "test_acc" or s.get("task") != "student":
        raise TableError(f"{path}: Tables 1-3 need student runs of methods scored by test accuracy "
                         f"({', '.join(e for e in CATALOG if CATALOG[e].scored_by == 'test_acc')}); "
                         f"this is {method} on the {s.get('task')} task")
    return {"ratio": ratio, "column": s["arch"], "row": s["method"], "arch": s["arch"], "seed": s["seed"],
            "value": 100.0 * s["test_acc"], "summary": str(path), "lam": s.get("params", {}).get("lam"),
            **_val_selected(s)}


def _val_selected(s: dict) -> dict:
    """The validation-selected epoch and its test score (%), where the run held out a validation split."""
    sel = s.get("val_selected")
    if not sel:
        return {"val_epoch": "", "at_val_epoch": ""}
    metric = "ncm_acc" if "ncm_acc" in sel else "test_acc"
    return {"val_epoch": sel["epoch"], "at_val_epoch": 100.0 * sel[metric]}


def collect(table: str, summaries: Iterable[Path], ratios: list[float], columns: list[str],
            methods: list[str] | None = None, lam: float | None = None) -> tuple[list[dict], dict]:
    """Records (one per run) and {(ratio, row, column): [values]}; raises TableError on any gap."""
    ratios_k = [_ratio_key(r) for r in ratios]
    columns = [_k_hat_key(c) if table == "4" else c for c in columns]
    rows = ratios_k if table == "4" else list(methods or table_methods())
    for m in rows if table != "4" else ():
        try:
            get(m)
        except ParamError as exc:
            raise TableError(str(exc)) from None
    records, cells, seen = [], {}, set()
    for path in summaries:
        rec = _record(Path(path), table)
        if table != "4" and lam is not None and rec["lam"] is not None and not math.isclose(rec["lam"], lam):
            raise TableError(f"{path}: lambda {rec['lam']} but the table's REFILLED rows use lambda {lam}")
        key = (rec["ratio"], rec["row"], rec["column"])
        if rec["ratio"] not in ratios_k or rec["row"] not in rows or rec["column"] not in columns:
            raise TableError(f"{path}: run (ratio {rec['ratio']}, {rec['row']}, {rec['column']}) is not in the "
                             f"table's grid (ratios {ratios_k}, rows {rows}, columns {columns})")
        if (key, rec["seed"]) in seen:
            raise TableError(f"{path}: a second run for {key} seed {rec['seed']}")
        seen.add((key, rec["seed"]))
        cells.setdefault(key, []).append(rec["value"])
        records.append(rec)
    keys = [(r, r, c) for r in ratios_k for c in columns] if table == "4" else \
        [(r, m, c) for r in ratios_k for m in rows for c in columns if applies(m, r)]
    seeds = {}
    for rec in records:
        seeds.setdefault((rec["ratio"], rec["row"], rec["column"]), set()).add(rec["seed"])
    check_complete(table, seeds, keys)
    return records, cells


def check_complete(table: str, seeds: dict, keys: list) -> set:
    """Every cell of `keys` has runs, and every cell the same seeds; `seeds`: {cell: {seed, ...}}.
    Returns the seeds."""
    missing = [k for k in keys if k not in seeds]
    if missing:
        raise TableError(f"table {table}: no runs for {len(missing)} cell(s), e.g. {missing[:3]}")
    every = set().union(*seeds.values())
    uneven = [(k, sorted(every - v)) for k, v in seeds.items() if v != every]
    if uneven:
        raise TableError(f"table {table}: every cell needs the same seeds {sorted(every)}; "
                         f"{len(uneven)} cell(s) lack some, e.g. {uneven[:3]}")
    return every


def _cell(cells: dict, key) -> str:
    return cell(cells[key]) if key in cells else NOT_APPLICABLE


def teacher_caption(teachers: list[Path] | None) -> str:
    """'Teacher wrn-28-4: 78.91 ± 0.20 % (2 seeds)' from the teacher runs' summaries."""
    if not teachers:
        raise TableError("table 3: give the teacher runs' summaries (--teachers); the caption reports their accuracy")
    records = []
    for path in teachers:
        try:
            s = read_json(path)
        except FileNotFoundError:
            raise TableError(f"{path}: no such teacher summary (did the teacher run finish?)") from None
        if s.get("task") != "teacher":
            raise TableError(f"{path}: not a teacher run (task {s.get('task')!r})")
        records.append(s)
    archs = sorted({s["arch"] for s in records})
    seeds = sorted(s["seed"] for s in records)
    if len(set(seeds)) != len(seeds):
        raise TableError(f"table 3: two teacher summaries for one seed ({seeds})")
    return (f"Teacher {', '.join(archs)}: {cell([100.0 * s['test_acc'] for s in records])} % test accuracy "
            f"({len(records)} seed{'s' if len(records) > 1 else ''})")


def write_table(table: str, summaries: list[Path], ratios: list[float], columns: list[str],
                methods: list[str] | None, lam: float | None, out: Path, long_out: Path, md_out: Path,
                teachers: list[Path] | None = None) -> Path:
    table = str(table)
    caption = teacher_caption(teachers) if table == "3" else ""
    if table == "3" and len(ratios) != 1:
        raise TableError(f"table 3 has one overlap ratio (standard KD: 1), got {ratios}")
    records, cells = collect(table, summaries, ratios, columns, methods, lam)
    ratios_k = [_ratio_key(r) for r in ratios]
    md = []
    if table == "4":
        cols = [_k_hat_key(c) for c in columns]
        arch = sorted({r["arch"] for r in records})
        header = ["ratio"] + [f"k_hat={c}" for c in cols]
        wide = [{"ratio": r, **{f"k_hat={c}": cell(cells[(r, r, c)]) for c in cols}} for r in ratios_k]
        md.append(f"**Table 4.** NCM accuracy (%) of the student's embedding after stage 1, mean ± std over seeds; "
                  f"student {', '.join(arch)}.\n")
        md.append("| K̂ | " + " | ".join(KHAT_LABELS.get(c, c) for c in cols) + " |")
        md.append("|---" * (len(cols) + 1) + "|")
        for r in ratios_k:
            md.append(f"| overlap ratio = {float(r) * 100:g}% | " + " | ".join(cell(cells[(r, r, c)]) for c in cols) + " |")
        long_fields = ["ratio", "k_hat", "arch", "seed", "ncm_acc", "val_epoch", "ncm_acc_at_val_epoch", "summary"]
        long_rows = [{"ratio": r["ratio"], "k_hat": r["column"], "arch": r["arch"], "seed": r["seed"],
                      "ncm_acc": r["value"], "val_epoch": r["val_epoch"], "ncm_acc_at_val_epoch": r["at_val_epoch"],
                      "summary": r["summary"]} for r in records]
    else:
        rows = list(methods or table_methods())
        header = ["ratio", "method"] + list(columns)
        wide = [{"ratio": r, "method": CATALOG[m].label, **{c: _cell(cells, (r, m, c)) for c in columns}}
                for r in ratios_k for m in rows]
        what = "test accuracy (%) at the final epoch, mean ± std over seeds"
        if table == "3":
            what = f"Standard knowledge distillation: {what}. {caption}"
        md.append(f"**Table {table}.** {what}.\n")
        for r in ratios_k:
            if table != "3":
                md.append(f"\n**Overlap ratio = {float(r) * 100:g}%**\n")
            md.append("| method | " + " | ".join(columns) + " |")
            md.append("|---" * (len(columns) + 1) + "|")
            for m in rows:
                md.append(f"| {CATALOG[m].label} | " + " | ".join(_cell(cells, (r, m, c)) for c in columns) + " |")
        long_fields = ["ratio", "method", "arch", "seed", "test_acc", "val_epoch", "test_acc_at_val_epoch", "summary"]
        long_rows = [{"ratio": r["ratio"], "method": r["row"], "arch": r["arch"], "seed": r["seed"],
                      "test_acc": r["value"], "val_epoch": r["val_epoch"], "test_acc_at_val_epoch": r["at_val_epoch"],
                      "summary": r["summary"]} for r in records]
        long_rows.sort(key=lambda x: (ratios_k.index(x["ratio"]), rows.index(x["method"]),
                                      list(columns).index(x["arch"]), x["seed"]))
    write_csv(out, wide, header)
    write_csv(long_out, long_rows, long_fields)
    atomic_write_text(md_out, "\n".join(md) + "\n")
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_lambda_auc(runs: list[Path], out: Path) -> list[dict]:
    """One row per stage-2 run: AUC of lambda_i for seen (teacher's classes) vs unseen instances,
    and of the teacher's raw confidence (-w_i) beside it."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for run in runs:
        run = Path(run)
        s = read_json(run / "summary.json")
        lam_rows = read_csv(run / "lambda_i.csv")
        seen = [int(r["seen"]) for r in lam_rows]
        lam_i = [float(r["lambda_i"]) for r in lam_rows]
        n_seen, n_unseen = sum(seen), len(seen) - sum(seen)
        both = n_seen and n_unseen
        auc = roc_auc_score(seen, lam_i) if both else None
        # the raw confidence for reference: a low w_i = -log max p_T means a confident teacher
        auc_conf = roc_auc_score(seen, [-float(r["confidence"]) for r in lam_rows]) \
            if both and "confidence" in lam_rows[0] else None
        mean = lambda xs: round(statistics.fmean(xs), 6) if xs else ""
        rows.append({"run": str(run), "ratio": _ratio_key(s["split"]["ratio"]), "arch": s["arch"], "seed": s["seed"],
                     "method": s["method"], "lam": s["params"]["lam"], "n_seen": n_seen, "n_unseen": n_unseen,
                     "mean_lambda_seen": mean([l for l, z in zip(lam_i, seen) if z]),
                     "mean_lambda_unseen": mean([l for l, z in zip(lam_i, seen) if not z]),
                     "auc": "" if auc is None else round(float(auc), 6),
                     "auc_confidence": "" if auc_conf is None else round(float(auc_conf), 6)})
    write_csv(out, rows, list(rows[0]))
    return rows


# ---- Table H: the joint label space C' ∪ C (supplement §2) --------------------------------------

REFERENCE = "reference"   # the training-free row: teacher head ⊕ student head (refilled joint-reference)
REFERENCE_LABEL = "Reference (teacher ⊕ student heads, no training)"
TABLE_H_METHODS = ("student", "refilled-minus", "refilled")   # the rows with a joint head, by default


def _experiment_of(path: Path) -> str:
    parts = Path(path).parts
    if "students" not in parts[:-1]:
        raise TableError(f"{path}: not under a students/<experiment>/ run directory; Table H reads the "
                         "experiment from the path")
    return parts[parts.index("students") + 1]


def _record_h(path: Path) -> dict:
    try:
        s = read_json(path)
    except FileNotFoundError:
        raise TableError(f"{path}: no such summary (did the run finish?)") from None
    j = s.get("joint")
    if not j:
        raise TableError(f"{path}: not a joint-head run or a reference (no 'joint' in the summary); "
                         "Table H needs `refilled train --joint-head` runs and `refilled joint-reference`")
    return {"experiment": _experiment_of(path), "ratio": _ratio_key(s["split"]["ratio"]), "row": s["method"],
            "arch": s["arch"], "seed": s["seed"], "summary": str(path),
            "acc_old": None if j["acc_old"] is None else 100.0 * j["acc_old"], "acc_new": 100.0 * j["acc_new"],
            "H": 100.0 * j["H"], "test_per_class": j["test"]["per_class"], "test_seed": j["test"]["seed"]}


def h_cell(records: list[dict]) -> str:
    """'Acc_C' / Acc_C / H', each 'mean ± std' over seeds; Acc_C' is '—' where there are no old
    classes (r = 1; H is then Acc_C)."""
    old = [r["acc_old"] for r in records]
    parts = [NOT_APPLICABLE if all(v is None for v in old) else cell(old)]
    return " / ".join(parts + [cell([r["acc_new"] for r in records]), cell([r["H"] for r in records])])


def write_table_h(summaries: list[Path], grid: list[tuple[str, list[float], list[str]]], methods: list[str] | None,
                  out: Path, long_out: Path, md_out: Path) -> Path:
    """Table H: per experiment and ratio, the rows (joint-head runs of `methods`, then the
    reference), the students as columns, cells 'Acc_C' / Acc_C / H' (%), mean ± std over seeds."""
    rows = list(methods or TABLE_H_METHODS)
    for m in rows:
        try:
            if get(m).scored_by != "test_acc":
                raise TableError(f"table h: {m} has no classifier over C (scored by {get(m).scored_by})")
        except ParamError as exc:
            raise TableError(str(exc)) from None
    rows.append(REFERENCE)
    grid_k = {exp: ([_ratio_key(r) for r in ratios], list(archs)) for exp, ratios, archs in grid}
    cells, seen, records = {}, set(), []
    for path in summaries:
        rec = _record_h(Path(path))
        ratios_k, archs = grid_k.get(rec["experiment"], ([], []))
        key = (rec["experiment"], rec["ratio"], rec["row"], rec["arch"])
        if rec["ratio"] not in ratios_k or rec["row"] not in rows or rec["arch"] not in archs:
            raise TableError(f"{path}: run {key} is not in Table H's grid ({grid_k}, rows {rows})")
        if (key, rec["seed"]) in seen:
            raise TableError(f"{path}: a second run for {key} seed {rec['seed']}")
        seen.add((key, rec["seed"]))
        cells.setdefault(key, []).append(rec)
        records.append(rec)
    keys = [(e, r, m, a) for e, (ratios_k, archs) in grid_k.items() for r in ratios_k for m in rows for a in archs]
    every = check_complete("h", {k: {r["seed"] for r in recs} for k, recs in cells.items()}, keys)
    label = lambda m: REFERENCE_LABEL if m == REFERENCE else f"{CATALOG[m].label} + joint head"
    archs_all = list(dict.fromkeys(a for _, archs in grid_k.values() for a in archs))
    wide = [{"experiment": e, "ratio": r, "method": label(m),
             **{a: h_cell(cells[(e, r, m, a)]) if a in archs else "" for a in archs_all}}
            for e, (ratios_k, archs) in grid_k.items() for r in ratios_k for m in rows]
    md = ["**Table H.** The student over the joint label space C' ∪ C (supplement §2): "
          "Acc_C' / Acc_C / H (%), Acc_C' on test images of the teacher's other classes C' \\ C, Acc_C on "
          "the student's classes C, both predicted over C' ∪ C, H their harmonic mean; mean ± std over seeds "
          f"{sorted(every)}. The balanced test set has the same number of images per class "
          f"({', '.join(sorted({str(r['test_per_class']) for r in records}))}) from C' \\ C and from C, drawn with "
          "the run's seed. At overlap 100% there are no old classes: Acc_C' is —, and H is the plain accuracy Acc_C."]
    for e, (ratios_k, archs) in grid_k.items():
        for r in ratios_k:
            md.append(f"\n**{e}, overlap ratio = {float(r) * 100:g}%**\n")
            md.append("| method | " + " | ".join(archs) + " |")
            md.append("|---" * (len(archs) + 1) + "|")
            for m in rows:
                md.append(f"| {label(m)} | " + " | ".join(h_cell(cells[(e, r, m, a)]) for a in archs) + " |")
    long_fields = ["experiment", "ratio", "method", "arch", "seed", "acc_old", "acc_new", "H", "test_per_class",
                   "test_seed", "summary"]
    order = list(grid_k)
    records.sort(key=lambda x: (order.index(x["experiment"]), grid_k[x["experiment"]][0].index(x["ratio"]),
                                rows.index(x["row"]), grid_k[x["experiment"]][1].index(x["arch"]), x["seed"]))
    long_rows = [{**{k: rec[k] for k in long_fields if k != "method"}, "method": rec["row"],
                  "acc_old": "" if rec["acc_old"] is None else rec["acc_old"]} for rec in records]
    write_csv(out, wide, ["experiment", "ratio", "method", *archs_all])
    write_csv(long_out, long_rows, long_fields)
    atomic_write_text(md_out, "\n".join(md) + "\n")
    return out
