"""Do the supplement's claims hold on our runs? `refilled claims` (results/claims.{csv,md}).

Each claim is tested by comparisons fixed before any run (docs/claims.md, "The rules"). A comparison is a paired difference per seed: both sides share the seed's teacher,
split and subsample, and a difference is averaged over the students of the table first, so
the seeds are the independent units. Its 95% interval is Student's t over the seeds
(mean ± t(0.975, n-1) · s/√n); with one seed there is no interval.

Verdict of a comparison "A > B by more than `threshold`": holds if the whole interval lies
above the threshold, fails if it lies below, inconclusive otherwise (also with one seed).
A claim holds if all its comparisons hold, fails if any fails, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from refilled.report import supplement
from refilled.io import atomic_write_text, read_json, write_csv

BASELINES = ("student", "rkd", "aml", "refilled-emb", "refilled-minus")
PAPER_AUC = 0.959          # the supplement, Figure 3: AUC of lambda_i, CIFAR-100, r = .6
LOW_OVERLAP_BELOW = 0.5     # claim (b): "low overlap" means r < 0.5, "high" r >= 0.5
STRONG_AUC = 0.9            # claim (c'): as strong as the paper's separation
LAM_SPREAD_MAX = 3.0        # claim (e'): "lambda matters little": accuracy spread over the grid < 3 points
FIELDS = ["claim", "comparison", "scope", "n_seeds", "mean", "ci_low", "ci_high", "rule", "verdict", "paper"]


class ClaimsError(ValueError):
    pass


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and Student-t interval over the values (None bounds with fewer than two)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdict(lo: float | None, hi: float | None, threshold: float = 0.0, above: bool = True) -> str:
    """'holds' if the interval lies wholly on the claimed side of the threshold, 'fails' if wholly
    on the other side, else 'inconclusive'."""
    if lo is None or hi is None:
        return "inconclusive"
    if (lo > threshold) if above else (hi < threshold):
        return "holds"
    if (hi < threshold) if above else (lo > threshold):
        return "fails"
    return "inconclusive"


def combine(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "fails" if "fails" in verdicts else "inconclusive"


@dataclass
class Comparison:
    claim: str
    comparison: str
    scope: str
    per_seed: dict[int, float]
    threshold: float = 0.0
    above: bool = True
    paper: float | None = None

    def row(self) -> dict:
        values = [self.per_seed[s] for s in sorted(self.per_seed)]
        mean, lo, hi = t_interval(values)
        side = ">" if self.above else "<"
        r = lambda x: "" if x is None else round(x, 4)
        return {"claim": self.claim, "comparison": self.comparison, "scope": self.scope, "n_seeds": len(values),
                "mean": r(mean), "ci_low": r(lo), "ci_high": r(hi),
                "rule": f"95% t-interval {side} {self.threshold:g}",
                "verdict": verdict(lo, hi, self.threshold, self.above), "paper": r(self.paper)}


def read_rows(path: Path) -> list[dict]:
    from refilled.report.tables import read_csv

    try:
        return read_csv(path)
    except FileNotFoundError:
        raise ClaimsError(f"{path}: no such file") from None


def paired(rows: list[dict], value: str, key: str, a: str, b: str, where: str, **match) -> dict[int, float]:
    """Per seed: mean over the students of (a − b), pairing rows on (arch, seed)."""
    side = {name: {(r["arch"], int(r["seed"])): float(r[value]) for r in rows
                   if r[key] == name and all(str(r[k]) == str(v) for k, v in match.items())} for name in (a, b)}
    if not side[a] or not side[b]:
        missing = a if not side[a] else b
        raise ClaimsError(f"{where}: no runs of {key} {missing} at {match}")
    if side[a].keys() != side[b].keys():
        raise ClaimsError(f"{where}: {a} and {b} have different (student, seed) runs at {match}: "
                          f"{sorted(side[a].keys() ^ side[b].keys())[:3]}")
    per_seed: dict[int, list[float]] = {}
    for (arch, seed), v in side[a].items():
        per_seed.setdefault(seed, []).append(v - side[b][(arch, seed)])
    return {s: statistics.fmean(v) for s, v in per_seed.items()}


def paper_gap(table: str, ratio: str, a: str, b: str) -> float | None:
    """The supplement's mean over its students of (a − b) at one ratio (Tables 1 and 2)."""
    cells = {}
    for r in supplement.table(table):
        if r["ratio"] == ratio and r["method"] in (a, b):
            cells.setdefault(r["student"], {})[r["method"]] = r["value"]
    gaps = [c[a] - c[b] for c in cells.values() if len(c) == 2]
    return statistics.fmean(gaps) if gaps else None


def ratios_of(rows: list[dict]) -> list[str]:
    return sorted({r["ratio"] for r in rows}, key=float)


def claim_a(rows: list[dict], table: str, where: str) -> list[Comparison]:
    """(a) REFILLED >= every baseline at every overlap ratio."""
    methods = {r["method"] for r in rows}
    return [Comparison("a", f"refilled - {b}", f"table{table} r={ratio}",
                       paired(rows, "test_acc", "method", "refilled", b, where, ratio=ratio),
                       paper=paper_gap(table, ratio, "refilled", b))
            for ratio in ratios_of(rows) for b in BASELINES if b in methods]


def claim_b(rows: list[dict], table: str, where: str) -> list[Comparison]:
    """(b) adaptive > constant weight (REFILLED > REFILLED⁻) over all ratios, and by more at low
    overlap (r < 0.5) than at high (r >= 0.5)."""
    gaps = {ratio: paired(rows, "test_acc", "method", "refilled", "refilled-minus", where, ratio=ratio)
            for ratio in ratios_of(rows)}
    seeds = sorted(set.intersection(*(set(g) for g in gaps.values())))
    mean_over = lambda rs, s: statistics.fmean(gaps[r][s] for r in rs)
    out = [Comparison("b", "refilled - refilled-minus", f"table{table} all ratios",
                      {s: mean_over(gaps, s) for s in seeds})]
    low = [r for r in gaps if float(r) < LOW_OVERLAP_BELOW]
    high = [r for r in gaps if float(r) >= LOW_OVERLAP_BELOW]
    if low and high:
        paper = [paper_gap(table, r, "refilled", "refilled-minus") for r in (*low, *high)]
        paper_diff = None if None in paper else \
            statistics.fmean(paper[:len(low)]) - statistics.fmean(paper[len(low):])
        out.append(Comparison("b", "(refilled - refilled-minus) at r < 0.5 minus at r >= 0.5", f"table{table}",
                              {s: mean_over(low, s) - mean_over(high, s) for s in seeds}, paper=paper_diff))
    return out


def claim_c(auc_rows: list[dict], ratio: str) -> list[Comparison]:
    """(c) lambda_i separates seen from unseen instances at r = .6: AUC > 0.5, and >= 0.9."""
    per_seed = {int(r["seed"]): float(r["auc"]) for r in auc_rows if r["ratio"] == ratio and r["auc"] != ""}
    if not per_seed:
        raise ClaimsError(f"lambda AUC: no run with an AUC at ratio {ratio}")
    return [Comparison("c", "AUC of lambda_i, seen vs unseen", f"r={ratio}", per_seed, 0.5, paper=PAPER_AUC),
            Comparison("c", "AUC of lambda_i, seen vs unseen (as strong as the paper's)", f"r={ratio}", per_seed,
                       STRONG_AUC, paper=PAPER_AUC)]


def claim_d(rows: list[dict], where: str) -> list[Comparison]:
    """(d) tuples beat triplets: NCM accuracy at k_hat = inf > k_hat = 1 after stage 1."""
    out = []
    for ratio in ratios_of(rows):
        paper = [supplement.value(4, ratio, "mobilenet-1.0", "stage1", k) for k in ("inf", "1")]
        out.append(Comparison("d", "ncm(k_hat=inf) - ncm(k_hat=1)", f"table4 r={ratio}",
                              paired(rows, "ncm_acc", "k_hat", "inf", "1", where, ratio=ratio),
                              paper=None if None in paper else paper[0] - paper[1]))
    return out


def claim_e(summaries: list[Path], best: float = 2.0) -> list[Comparison]:
    """(e) lambda matters little and is best near 2 (Figure 2's sweep): for each lambda of the
    grid, acc(2) - acc(lambda) > 0 is the claim "2 is best"; and the accuracy spread over the
    grid (max - min of the per-seed means over students) is below LAM_SPREAD_MAX points."""
    acc: dict[float, dict[int, list[float]]] = {}
    for path in summaries:
        s = read_json(Path(path))
        acc.setdefault(float(s["params"]["lam"]), {}).setdefault(int(s["seed"]), []).append(100 * s["test_acc"])
    if best not in acc:
        raise ClaimsError(f"lambda sweep: no run at lambda {best:g} (the grid has {sorted(acc)})")
    mean = {lam: {s: statistics.fmean(v) for s, v in seeds.items()} for lam, seeds in acc.items()}
    seeds = sorted(set.intersection(*(set(m) for m in mean.values())))
    out = [Comparison("e", f"acc(lambda={best:g}) - acc(lambda={lam:g})", "figure2",
                      {s: mean[best][s] - mean[lam][s] for s in seeds}) for lam in sorted(mean) if lam != best]
    spread = {s: max(m[s] for m in mean.values()) - min(m[s] for m in mean.values()) for s in seeds}
    out.append(Comparison("e", "accuracy spread over the lambda grid (points)", "figure2", spread,
                          LAM_SPREAD_MAX, above=False))
    return out


STATEMENTS = {
    "a": "REFILLED >= every baseline (Student, RKD, AML, REFILLED^EMB, REFILLED^-) at every overlap ratio",
    "b": "the adaptive weight beats the constant one (REFILLED > REFILLED^-), most at low overlap",
    "c": "lambda_i separates seen from unseen classes (AUC; the paper: 0.959 at r = .6)",
    "d": "tuples beat triplets in stage 1 (NCM at k_hat = inf > k_hat = 1; Table 4)",
    "e": "lambda matters little and is best near 2 (Figure 2)",
}


def evaluate_claims(tables: dict[str, Path], table4: Path | None, lambda_auc: Path | None,
                    lambda_sweep: list[Path], auc_ratio: str = "0.6") -> list[dict]:
    """Every comparison's row (FIELDS). `tables`: {"1"|"2": long CSV of that table}."""
    comparisons: list[Comparison] = []
    for table, path in tables.items():
        rows = read_rows(path)
        comparisons += claim_a(rows, table, str(path)) + claim_b(rows, table, str(path))
    if lambda_auc is not None:
        comparisons += claim_c(read_rows(lambda_auc), auc_ratio)
    if table4 is not None:
        comparisons += claim_d(read_rows(table4), str(table4))
    if lambda_sweep:
        comparisons += claim_e(lambda_sweep)
    return [c.row() for c in comparisons]


def markdown(rows: list[dict], note: str = "") -> str:
    lines = ["# Do the supplement's claims hold?", ""]
    if note:
        lines += [note, ""]
    lines += ["Paired per-seed differences (averaged over the students first), 95% Student-t intervals over "
              "seeds. A comparison holds if its interval lies wholly on the claimed side of its threshold, fails "
              "if wholly on the other side, and is inconclusive otherwise; a claim holds if all of its comparisons "
              "hold and fails if any fails. `paper`: the same difference in the supplement's tables (CIFAR-100 / "
              "CUB; another dataset, for orientation only).", "",
              "| claim | statement | comparisons | verdict |", "|---|---|---|---|"]
    for claim, statement in STATEMENTS.items():
        mine = [r for r in rows if r["claim"] == claim]
        if mine:
            counts = {v: sum(r["verdict"] == v for r in mine) for v in ("holds", "fails", "inconclusive")}
            told = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
            lines.append(f"| ({claim}) | {statement} | {told} | **{combine([r['verdict'] for r in mine])}** |")
    lines += ["", "| claim | comparison | scope | n | mean | 95% interval | rule | verdict | paper |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        interval = "—" if r["ci_low"] == "" else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        paper = "" if r["paper"] == "" else f"{r['paper']:.2f}"
        lines.append(f"| ({r['claim']}) | {r['comparison']} | {r['scope']} | {r['n_seeds']} | {r['mean']:.2f} | "
                     f"{interval} | {r['rule']} | {r['verdict']} | {paper} |")
    return "\n".join(lines) + "\n"


def write_claims(rows: list[dict], out: Path, md_out: Path, note: str = "") -> None:
    if not rows:
        raise ClaimsError("no claim could be tested: give at least one of --table, --table4, --lambda-auc, "
                          "--lambda-sweep")
    write_csv(out, rows, FIELDS)
    atomic_write_text(md_out, markdown(rows, note))
