"""When does distilling across tasks pay? The gain-vs-data sweep (`refilled gain-vs-data`).

At a fixed teacher, the student's training images per class vary; at each point and overlap
ratio: each method's accuracy minus the reference method's (the profile's first, Student),
paired per seed, and beside them the reference's own accuracy and the NCM accuracy of the
teacher's embedding on the student's classes (class means from the same training images):
distillation cannot be expected to help where that embedding is weaker than what the student
learns alone. Intervals: Student's t over seeds, as in refilled.report.claims.
"""

from __future__ import annotations

from pathlib import Path

from refilled.report.claims import ClaimsError, t_interval
from refilled.io import read_json, write_csv

FIELDS = ["per_class", "ratio", "quantity", "n_seeds", "mean", "ci_low", "ci_high"]
TEACHER_NCM = "teacher NCM on the student's classes"


def _ratio(x) -> str:
    return f"{float(x):g}"


def per_seed_values(summaries: list[Path], teacher_ncm: list[Path], reference: str) -> list[dict]:
    """One row per (per_class, ratio, quantity, seed): the values the intervals are taken over."""
    acc = {}
    for path in summaries:
        s = read_json(Path(path))
        key = (int(s["data"]["per_class"]), _ratio(s["split"]["ratio"]), s["method"], int(s["seed"]))
        if key in acc:
            raise ClaimsError(f"{path}: a second run for per_class {key[0]}, ratio {key[1]}, {key[2]}, seed {key[3]}")
        acc[key] = 100.0 * s["test_acc"]
    rows = []
    for (n, ratio, method, seed), value in sorted(acc.items()):
        if method == reference:
            rows.append({"per_class": n, "ratio": ratio, "quantity": f"{reference} accuracy", "seed": seed,
                         "value": value})
            continue
        ref = acc.get((n, ratio, reference, seed))
        if ref is None:
            raise ClaimsError(f"gain vs data: no {reference} run at per_class {n}, ratio {ratio}, seed {seed} "
                              f"to pair {method} with")
        rows.append({"per_class": n, "ratio": ratio, "quantity": f"{method} - {reference}", "seed": seed,
                     "value": value - ref})
    for path in teacher_ncm:
        t = read_json(Path(path))
        ratio = _ratio(read_json(Path(t["split"]))["ratio"])
        rows.append({"per_class": int(t["per_class"]), "ratio": ratio, "quantity": TEACHER_NCM, "seed": int(t["seed"]),
                     "value": 100.0 * t["ncm_acc"]})
    return rows


def summarize(values: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for v in values:
        groups.setdefault((v["per_class"], v["ratio"], v["quantity"]), []).append(v["value"])
    out = []
    for (n, ratio, q), vals in sorted(groups.items(), key=lambda kv: (float(kv[0][1]), kv[0][2], kv[0][0])):
        mean, lo, hi = t_interval(vals)
        r = lambda x: "" if x is None else round(x, 4)
        out.append({"per_class": n, "ratio": ratio, "quantity": q, "n_seeds": len(vals), "mean": r(mean),
                    "ci_low": r(lo), "ci_high": r(hi)})
    return out


def plot(values: list[dict], out: Path, reference: str) -> list[Path]:
    """Top row: gains over the reference per ratio; bottom row: the reference's accuracy and the
    teacher-embedding NCM. Bands: the same t-intervals as the CSV."""
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(values)
    ratios = sorted(df["ratio"].unique(), key=float)
    interval = lambda x: (lambda m, lo, hi: (m, m) if lo is None else (lo, hi))(*t_interval(list(x)))
    gains = df["quantity"].str.endswith(f" - {reference}")
    from refilled.report.figures import pyplot, save_png_pdf

    plt = pyplot()
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(2, len(ratios), figsize=(3.6 * len(ratios), 6), sharex=True, squeeze=False)
    for j, ratio in enumerate(ratios):
        for i, part in enumerate((df[gains], df[~gains])):
            ax = axes[i][j]
            sns.lineplot(data=part[part["ratio"] == ratio], x="per_class", y="value", hue="quantity", marker="o",
                         errorbar=interval, err_style="band", ax=ax)
            ax.set_xscale("log")
            ax.set_title(f"r = {ratio}" if i == 0 else "")
            ax.set_xlabel("student's training images per class")
            ax.set_ylabel(f"accuracy gain over {reference} (points)" if i == 0 else "accuracy (%)")
            if i == 0:
                ax.axhline(0, color="black", lw=0.8)
            ax.legend(fontsize=7, title=None)
    fig.suptitle("When does distilling across tasks pay? (95% t-intervals over seeds)")
    fig.tight_layout()
    paths = save_png_pdf(fig, out)
    plt.close(fig)
    return paths


def write_gain(summaries: list[Path], teacher_ncm: list[Path], reference: str, csv_out: Path,
               figure_out: Path) -> list[dict]:
    values = per_seed_values(summaries, teacher_ncm, reference)
    rows = summarize(values)
    write_csv(csv_out, rows, FIELDS)
    plot(values, figure_out, reference)
    return rows
