"""Our tables beside the supplement's (`refilled reproduction`: results/reproduction.{csv,md}).

Where a table ran on the paper's dataset with the paper's students (the paper profile), each
of our cells is put beside the supplement's value: the difference, and whether the
supplement's value lies inside our 95% Student-t interval over seeds. Elsewhere (the
Fashion-MNIST profiles) the numbers cannot match, and what is compared is the ordering of the
methods: per (ratio, student) cell block, Kendall's tau between our mean accuracies and the
supplement's over the methods both have, each of our students matched to the paper's student
that stands to the paper's teacher as ours stands to our teacher (`paper_counterpart`: the
same deeper/shallower, wider/thinner relation for WRNs, the nearest width ratio for
MobileNets); a student given without its counterpart is matched by position.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from refilled.report import supplement
from refilled.models.archs import paper_name, parse_arch
from refilled.report.claims import ClaimsError, read_rows, t_interval
from refilled.io import atomic_write_text, write_csv

PAPER_DATASET = {"1": "cub200", "2": "cifar100", "3": "cifar100", "4": "cub200"}
PAPER_TEACHER = {"1": "mobilenet-1.0", "2": "wrn-40-2", "3": "wrn-28-4", "4": "mobilenet-1.0"}
VALUE_FIELDS = ["comparison", "table", "ratio", "student", "method", "k_hat", "n_seeds", "ours_mean", "ours_ci_low",
                "ours_ci_high", "paper", "ours_minus_paper", "paper_in_interval"]
ORDER_FIELDS = ["paper_student", "methods", "kendall_tau", "ours_order", "paper_order"]
# one CSV: "value" rows (same dataset and students) and "ordering" rows (another dataset)
FIELDS = VALUE_FIELDS + ORDER_FIELDS


def paper_counterpart(table: str, student: str, teacher: str) -> str | None:
    """The supplement's student of `table` that stands to the paper's teacher as `student` stands
    to `teacher`: for WRNs the same (depth, width) relation, each of deeper / equal / shallower
    and wider / equal / thinner (under a (16,2) teacher, (10,1) is the paper's (16,1) under
    (40,2)); for MobileNets the nearest student/teacher width ratio. None: no such student."""
    (kind, s), (t_kind, t) = parse_arch(student), parse_arch(teacher)
    p_kind, p_teacher = parse_arch(PAPER_TEACHER[str(table)])
    if not kind == t_kind == p_kind:
        return None
    candidates = supplement.students(table)
    if kind == "mobilenet":
        return min(candidates, key=lambda c: abs(parse_arch(c)[1][0] / p_teacher[0] - s[0] / t[0]))
    relation = lambda a, b: tuple((x > y) - (x < y) for x, y in zip(a, b))
    return next((c for c in candidates if relation(parse_arch(c)[1], p_teacher) == relation(s, t)), None)


def _cells(table: str, rows: list[dict]) -> dict[tuple, list[float]]:
    """{(ratio, student, method, k_hat): [per-seed values]} of one of our long CSVs."""
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        if table == "4":
            key, value = (r["ratio"], r["arch"], "stage1", r["k_hat"]), r["ncm_acc"]
        else:
            key, value = (r["ratio"], r["arch"], r["method"], ""), r["test_acc"]
        cells.setdefault(key, []).append(float(value))
    return cells


def value_rows(table: str, cells: dict) -> list[dict]:
    out = []
    for (ratio, student, method, k_hat), values in cells.items():
        paper = supplement.value(table, ratio, paper_name(student), method, k_hat)
        if paper is None:
            continue
        mean, lo, hi = t_interval(values)
        inside = "" if lo is None else ("yes" if lo <= paper <= hi else "no")
        r = lambda x: "" if x is None else round(x, 2)
        out.append({"comparison": "value", "table": table, "ratio": ratio, "student": student, "method": method,
                    "k_hat": k_hat,
                    "n_seeds": len(values), "ours_mean": r(mean), "ours_ci_low": r(lo), "ours_ci_high": r(hi),
                    "paper": paper, "ours_minus_paper": r(mean - paper), "paper_in_interval": inside})
    return out


def _pairs(table: str, students: list[str]) -> list[tuple[str, str]]:
    """(ours, the paper's) from 'ours=paper' items; a bare 'ours' takes the paper's student at its
    position; 'ours=' (no counterpart) is left out."""
    paper_students = supplement.students(table)
    pairs = []
    for i, item in enumerate(students):
        ours, given, paper = item.partition("=")
        if not given:
            paper = paper_students[i] if i < len(paper_students) else ""
        if paper and paper not in paper_students:
            raise ClaimsError(f"table {table}: {paper!r} is not one of the supplement's students "
                              f"({', '.join(paper_students)})")
        if paper:
            pairs.append((ours, paper))
    return pairs


def order_rows(table: str, cells: dict, students: list[str]) -> list[dict]:
    from scipy.stats import kendalltau

    out = []
    for ratio in sorted({k[0] for k in cells}, key=float):
        for student, paper_student in _pairs(table, students):
            ours = {m: statistics.fmean(v) for (r, s, m, _), v in cells.items() if r == ratio and s == student}
            theirs = {m: supplement.value(table, ratio, paper_student, m) for m in ours}
            both = [m for m in ours if theirs[m] is not None]
            if len(both) < 2:
                continue
            tau = kendalltau([ours[m] for m in both], [theirs[m] for m in both]).statistic
            rank = lambda d: " > ".join(sorted(both, key=lambda m: -d[m]))
            out.append({"comparison": "ordering", "table": table, "ratio": ratio, "student": student,
                        "paper_student": paper_student,
                        "methods": len(both), "kendall_tau": "" if tau != tau else round(float(tau), 3),
                        "ours_order": rank(ours), "paper_order": rank(theirs)})
    return out


def write_reproduction(tables: list[tuple[str, Path, str, list[str]]], out: Path, md_out: Path) -> tuple[list, list]:
    """`tables`: (table number, our long CSV, our dataset, our students: 'ours=paper' or, in the
    paper's order, 'ours')."""
    values, orders = [], []
    for table, path, dataset, students in tables:
        if not supplement.table(table):
            raise ClaimsError(f"table {table}: the supplement has no such table")
        cells = _cells(table, read_rows(path))
        ours = {paper_name(x.partition("=")[0]) for x in students}   # the authors' networks are the paper's shapes
        if dataset == PAPER_DATASET[table] and ours <= set(supplement.students(table)):
            values += value_rows(table, cells)
        elif table != "4":
            orders += order_rows(table, cells, students)
    md = ["# Our tables beside the supplement's", ""]
    if values:
        inside = [v for v in values if v["paper_in_interval"]]
        n_in = sum(v["paper_in_interval"] == "yes" for v in inside)
        md += [f"Same dataset and students: {len(values)} cells; the supplement's value lies inside our 95% "
               f"interval in {n_in} of the {len(inside)} cells that have one.", "",
               "| table | ratio | student | method | k_hat | ours (mean) | 95% interval | paper | ours − paper | inside |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for v in values:
            ci = "—" if v["ours_ci_low"] == "" else f"[{v['ours_ci_low']}, {v['ours_ci_high']}]"
            md.append(f"| {v['table']} | {v['ratio']} | {v['student']} | {v['method']} | {v['k_hat']} | "
                      f"{v['ours_mean']} | {ci} | {v['paper']} | {v['ours_minus_paper']} | "
                      f"{v['paper_in_interval'] or '—'} |")
        md.append("")
    if orders:
        taus = [o["kendall_tau"] for o in orders if o["kendall_tau"] != ""]
        mean_tau = f"{statistics.fmean(taus):.3f}" if taus else "n/a"
        md += ["Another dataset (the numbers cannot match): does the ordering of the methods agree? Kendall's tau "
               "between our means and the supplement's per (ratio, student), each of our students beside the paper's "
               "that stands to its teacher as ours to our teacher; "
               f"mean tau over {len(taus)} blocks: {mean_tau} (1: same order, 0: unrelated, −1: reversed).", "",
               "| table | ratio | ours | paper's | methods | Kendall tau | our order | paper's order |",
               "|---|---|---|---|---|---|---|---|"]
        for o in orders:
            md.append(f"| {o['table']} | {o['ratio']} | {o['student']} | {o['paper_student']} | {o['methods']} | "
                      f"{o['kendall_tau'] if o['kendall_tau'] != '' else 'n/a (ours tied)'} | {o['ours_order']} | "
                      f"{o['paper_order']} |")
    write_csv(out, [{k: row.get(k, "") for k in FIELDS} for row in values + orders], FIELDS)
    atomic_write_text(md_out, "\n".join(md) + "\n")
    return values, orders
