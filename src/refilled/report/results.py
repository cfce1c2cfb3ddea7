"""What DVC shows: results/metrics.json (`dvc metrics`) and the CSVs behind `dvc plots`.

`refilled metrics` gathers the tables' long CSVs (one row per run), lambda_auc.csv and, where
the claims ran, claims.csv into one nested JSON: per table, experiment, ratio, student and
method the mean over seeds and the number of seeds. `refilled plot-data` writes the curves
of Figure 1 (per epoch, mean over seeds) and Figure 2 (per student and lambda, mean over
seeds) as CSVs at fixed paths, because dvc.yaml's plots name their files statically.
Torch-free; bad input stops with the file and the key named, and nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from refilled.io import write_csv, write_json
from refilled.report.tables import read_csv

# the long CSV's value columns, per table (tables.write_table / write_table_h)
VALUE_COLUMNS = {"1": ["test_acc"], "2": ["test_acc"], "3": ["test_acc"], "4": ["ncm_acc"],
                 "h": ["acc_old", "acc_new", "H"]}
# Figure 1's columns of metrics.csv, per stage; accuracies in % as in the figure
CONVERGENCE = {"stage1": {"cm": 1.0, "ncm_acc": 100.0}, "stage2": {"ce": 1.0, "teach": 1.0, "test_acc": 100.0}}


class ResultsError(ValueError):
    """Bad input to `refilled metrics` / `refilled plot-data`; the message names the file and key."""


def _float(path: Path, row: dict, key: str) -> float | None:
    text = row.get(key)
    if text is None:
        raise ResultsError(f"{path}: no column {key!r}")
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ResultsError(f"{path}: {key} = {text!r} is not a number") from None


def _rows(path: Path, needed: list[str]) -> list[dict]:
    try:
        rows = read_csv(path)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    if not rows:
        raise ResultsError(f"{path}: no rows")
    missing = [k for k in needed if k not in rows[0]]
    if missing:
        raise ResultsError(f"{path}: no column {', '.join(map(repr, missing))}")
    return rows


def experiment_of(summary: str) -> str:
    """The experiment of a student run, from its path (.../students/<experiment>/...)."""
    parts = Path(summary).parts
    return parts[parts.index("students") + 1] if "students" in parts[:-1] else ""


def _mean_cell(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    return {"mean": round(statistics.fmean(present), 4) if present else None, "n_seeds": len(values)}


def table_metrics(table: str, path: Path) -> dict:
    """{experiment: {r<ratio>: {student: {method: {mean, n_seeds}}}}} of one table's long CSV
    (Table 4: the method level is k_hat=<K>; Table H: one {mean, n_seeds} per accuracy)."""
    if table not in VALUE_COLUMNS:
        raise ResultsError(f"--table {table}: not one of {', '.join(VALUE_COLUMNS)}")
    row_key = "k_hat" if table == "4" else "method"
    columns = VALUE_COLUMNS[table]
    rows = _rows(path, ["ratio", row_key, "arch", "seed", "summary", *columns])
    cells: dict[tuple, dict[str, list]] = {}
    for row in rows:
        exp = row.get("experiment") or experiment_of(row["summary"])
        method = f"k_hat={row['k_hat']}" if table == "4" else row["method"]
        key = (exp, f"r{row['ratio']}", row["arch"], method)
        for c in columns:
            cells.setdefault(key, {}).setdefault(c, []).append(_float(path, row, c))
    out: dict = {}
    for (exp, ratio, arch, method), values in cells.items():
        leaf = {c: _mean_cell(v) for c, v in values.items()}
        out.setdefault(exp, {}).setdefault(ratio, {}).setdefault(arch, {})[method] = \
            leaf[columns[0]] if len(columns) == 1 else leaf
    return out


def lambda_auc_metrics(path: Path) -> dict:
    """{r<ratio>: {student: {auc: {mean, n_seeds}}}} of lambda_auc.csv (one row per stage-2 run)."""
    rows = _rows(path, ["ratio", "arch", "auc"])
    by: dict[tuple, list] = {}
    for row in rows:
        by.setdefault((f"r{row['ratio']}", row["arch"]), []).append(_float(path, row, "auc"))
    out: dict = {}
    for (ratio, arch), values in by.items():
        out.setdefault(ratio, {})[arch] = {"auc": _mean_cell(values)}
    return out


def claims_metrics(path: Path) -> dict:
    """{claim: {comparison: {verdict, mean, n_seeds}}} of claims.csv."""
    rows = _rows(path, ["claim", "comparison", "n_seeds", "mean", "verdict"])
    out: dict = {}
    for row in rows:
        n = _float(path, row, "n_seeds")
        out.setdefault(row["claim"], {})[row["comparison"]] = {
            "verdict": row["verdict"], "mean": _float(path, row, "mean"), "n_seeds": None if n is None else int(n)}
    return out


def write_metrics(profile: str, tables: list[tuple[str, Path]], lambda_auc: Path | None, claims: Path | None,
                  out: Path) -> dict:
    """Everything is read (and checked) before the one atomic write."""
    metrics: dict = {"profile": profile}
    for table, path in tables:
        name = f"table{table}" if table != "h" else "table_h"
        if name in metrics:
            raise ResultsError(f"--table {table} given twice")
        metrics[name] = table_metrics(table, Path(path))
    if lambda_auc:
        metrics["lambda_auc"] = lambda_auc_metrics(Path(lambda_auc))
    if claims:
        metrics["claims"] = claims_metrics(Path(claims))
    write_json(out, metrics)
    return metrics


def _mean_by_epoch(runs: list[Path], columns: dict[str, float]) -> list[dict]:
    """Per epoch where every run has every column: the mean over runs (seeds) of each column x scale."""
    series = []
    for run in runs:
        path = Path(run) / "metrics.csv"
        rows = _rows(path, ["epoch", *columns])
        series.append({int(r["epoch"]): {c: _float(path, r, c) for c in columns} for r in rows})
    epochs = sorted(e for e in set.intersection(*(set(s) for s in series))
                    if all(s[e][c] is not None for s in series for c in columns))
    return [{"epoch": e, **{c: round(scale * statistics.fmean(s[e][c] for s in series), 6)
                            for c, scale in columns.items()}, "n_seeds": len(series)} for e in epochs]


def write_convergence(runs: list[Path], stage1_out: Path, stage2_out: Path) -> tuple[list, list]:
    """Figure 1's runs, [stage1, stage2] per seed (as `refilled figure --figure 1` takes them)."""
    if not runs or len(runs) % 2:
        raise ResultsError(f"figure 1 needs pairs of run directories (stage 1, stage 2), got {len(runs)}")
    stage1 = _mean_by_epoch(runs[0::2], CONVERGENCE["stage1"])
    stage2 = _mean_by_epoch(runs[1::2], CONVERGENCE["stage2"])
    for rows, runs_of, where in ((stage1, runs[0::2], "stage 1"), (stage2, runs[1::2], "stage 2")):
        if not rows:
            raise ResultsError(f"{where} runs {', '.join(map(str, runs_of))}: no epoch with every column")
    write_csv(stage1_out, stage1, list(stage1[0]))
    write_csv(stage2_out, stage2, list(stage2[0]))
    return stage1, stage2


def write_lambda_sweep(runs: list[Path], out: Path) -> list[dict]:
    """Figure 2's runs: per (student, lambda) the mean test accuracy (%) over seeds."""
    from refilled.io import read_json

    by: dict[tuple, list[float]] = {}
    for run in runs:
        path = Path(run) / "summary.json"
        try:
            s = read_json(path)
            key, acc = (s["arch"], float(s["params"]["lam"])), 100.0 * float(s["test_acc"])
        except FileNotFoundError:
            raise ResultsError(f"{path}: no such file") from None
        except (KeyError, TypeError) as exc:
            raise ResultsError(f"{path}: no {exc} (a stage-2 run's summary has arch, params.lam, test_acc)") from None
        by.setdefault(key, []).append(acc)
    rows = [{"student": arch, "lam": lam, "test_acc": round(statistics.fmean(v), 4), "n_seeds": len(v)}
            for (arch, lam), v in sorted(by.items())]
    if not rows:
        raise ResultsError("figure 2: no runs")
    write_csv(out, rows, list(rows[0]))
    return rows


def cmd_metrics(args) -> int:
    metrics = write_metrics(args.profile, [(t, Path(p)) for t, p in args.table], args.lambda_auc, args.claims,
                            args.out)
    print(f"metrics: {', '.join(k for k in metrics if k != 'profile')} in {args.out}")
    return 0


def cmd_plot_data(args) -> int:
    if args.figure == "1":
        if len(args.out) != 2:
            raise ResultsError("--figure 1 writes two CSVs: --out STAGE1.csv STAGE2.csv")
        s1, s2 = write_convergence(args.runs, *args.out)
        print(f"figure 1: {len(s1)} stage-1 and {len(s2)} stage-2 epochs")
    else:
        if len(args.out) != 1:
            raise ResultsError("--figure 2 writes one CSV: --out SWEEP.csv")
        rows = write_lambda_sweep(args.runs, args.out[0])
        print(f"figure 2: {len(rows)} (student, lambda) points")
    return 0


def add_results_parsers(subparsers) -> None:
    m = subparsers.add_parser(
        "metrics", help="results/metrics.json for `dvc metrics`: every table cell's mean and seeds, AUC, claims",
        description="Per table, experiment, ratio, student and method: the mean over seeds and the number of seeds "
                    "(from the tables' long CSVs); the lambda AUC per ratio and student; the claims' verdicts and "
                    "mean differences where a claims CSV is given. One JSON, written atomically.")
    m.add_argument("--profile", required=True, help="the profile's name, recorded in the JSON")
    m.add_argument("--table", nargs=2, action="append", default=[], metavar=("N", "LONG_CSV"),
                   help=f"table N ({', '.join(VALUE_COLUMNS)}) and its long CSV; repeatable")
    m.add_argument("--lambda-auc", type=Path, help="results/lambda_auc.csv")
    m.add_argument("--claims", type=Path, help="results/claims.csv (where the claims ran)")
    m.add_argument("--out", required=True, type=Path)
    m.set_defaults(func=cmd_metrics)
    p = subparsers.add_parser(
        "plot-data", help="the CSVs behind `dvc plots`: Figure 1's convergence, Figure 2's lambda sweep",
        description="1: per epoch, the mean over seeds of the stage-1 loss and NCM accuracy (%) and of the stage-2 "
                    "cross-entropy, teaching term and test accuracy (%), from the runs' metrics.csv; 2: per student "
                    "and lambda, the mean test accuracy (%) over seeds, from the runs' summary.json.")
    p.add_argument("--figure", required=True, choices=("1", "2"))
    p.add_argument("--runs", required=True, nargs="+", type=Path,
                   help="1: the stage-1 run then the stage-2 run (repeat the pair per seed); 2: stage-2 run directories")
    p.add_argument("--out", required=True, nargs="+", type=Path, help="1: STAGE1.csv STAGE2.csv; 2: SWEEP.csv")
    p.set_defaults(func=cmd_plot_data)
