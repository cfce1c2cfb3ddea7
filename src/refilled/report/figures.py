"""The supplement's figures from run directories (backs `refilled figure`).

Figure 1: convergence of REFILLED (stage-1 loss and NCM accuracy, then stage-2 CE,
teaching term and test accuracy, per epoch). Figure 2: REFILLED's test accuracy against
lambda, one line per student. Figure 3: histograms of lambda_i over the student's training
instances, seen vs unseen classes, one panel per overlap ratio, with the AUC.
Each figure is written as OUT.png and OUT.pdf (atomically).
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from refilled.io import atomic_write_bytes, read_json
from refilled.report.tables import read_csv


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def save_png_pdf(fig, out: Path) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150 if ext == "png" else None, bbox_inches="tight")
        path = Path(f"{out}.{ext}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _series(rows: list[dict], name: str, scale: float = 1.0) -> dict[int, float]:
    """{epoch: value} of one metrics.csv column; epochs without a value (not evaluated) are left out."""
    return {int(r["epoch"]): scale * float(r[name]) for r in rows if r.get(name) not in (None, "")}


def _mean_band(ax, series: list[dict[int, float]], label: str, color, marker=None):
    """Mean over seeds per epoch, with a min-max band when there is more than one seed."""
    epochs = sorted(set.intersection(*(set(s) for s in series)))
    cols = [[s[e] for s in series] for e in epochs]
    mean = [statistics.fmean(c) for c in cols]
    line, = ax.plot(epochs, mean, label=label, color=color, marker=marker, markersize=3)
    if len(series) > 1:
        ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.2)
    return line


def _twin_panel(ax, left: list[tuple], right: tuple, xlabel: str, ylabels: tuple[str, str], title: str) -> None:
    """The curves `left` on the panel's axis and `right` on a twin axis, each (series, label,
    colour, marker), with one legend under the panel."""
    lines = [_mean_band(ax, *curve) for curve in left]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabels[0])
    twin = ax.twinx()
    lines.append(_mean_band(twin, *right))
    twin.set_ylabel(ylabels[1])
    twin.grid(False)
    ax.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(lines), fontsize=7,
              frameon=False)
    ax.set_title(title)


def figure1(runs: list[Path], out: Path) -> list[Path]:
    """runs = [stage1, stage2, stage1, stage2, ...]: one pair per seed."""
    if len(runs) % 2:
        raise ValueError("figure 1 needs pairs of run directories: stage 1 then stage 2 (one pair per seed)")
    pairs = [(Path(runs[i]), Path(runs[i + 1])) for i in range(0, len(runs), 2)]
    s1 = [read_csv(a / "metrics.csv") for a, _ in pairs]
    s2 = [read_csv(b / "metrics.csv") for _, b in pairs]
    info = read_json(pairs[0][1] / "summary.json")
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    from matplotlib.ticker import MaxNLocator

    _twin_panel(ax1, [([_series(r, "cm") for r in s1], "stage-1 loss (comparison matching KL ×1000)", "C0", "o")],
                ([_series(r, "ncm_acc", 100) for r in s1], "NCM accuracy (test, %)", "C3", "s"),
                "epoch (stage 1)", ("stage-1 loss", "NCM accuracy (%)"), "(a) stage 1: embedding distillation")
    _twin_panel(ax2, [([_series(r, "ce") for r in s2], "cross-entropy", "C0", "o"),
                      ([_series(r, "teach") for r in s2], "teaching term (τ²·λ_i·KL)", "C1", "^")],
                ([_series(r, "test_acc", 100) for r in s2], "test accuracy (%)", "C3", "s"),
                "epoch (stage 2)", ("loss", "test accuracy (%)"), "(b) stage 2: local classifier distillation")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ratio = info["split"]["ratio"]
    fig.suptitle(f"Convergence of REFILLED: {info['split']['dataset']}, overlap ratio {ratio * 100:g}%, "
                 f"student {info['arch']}, λ = {info['params']['lam']:g}, {len(pairs)} seed(s)"
                 + (" (band: min–max)" if len(pairs) > 1 else ""))
    fig.tight_layout()
    return save_png_pdf(fig, out)


def figure2(runs: list[Path], out: Path) -> list[Path]:
    """Stage-2 REFILLED runs over students x lambdas x seeds."""
    data: dict[str, dict[float, list[float]]] = {}
    meta = None
    for run in runs:
        s = read_json(Path(run) / "summary.json")
        meta = meta or s
        data.setdefault(s["arch"], {}).setdefault(float(s["params"]["lam"]), []).append(100 * s["test_acc"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    markers = "osd^v<>"
    n_seeds = 1
    for i, (arch, by_lam) in enumerate(data.items()):
        lams = sorted(by_lam)
        means = [statistics.fmean(by_lam[l]) for l in lams]
        stds = [statistics.stdev(by_lam[l]) if len(by_lam[l]) > 1 else 0.0 for l in lams]
        n_seeds = max(n_seeds, *(len(by_lam[l]) for l in lams))
        ax.errorbar(lams, means, yerr=stds if n_seeds > 1 else None, label=arch, marker=markers[i % len(markers)],
                    capsize=3, markersize=4)
    ax.set_xscale("log", base=2)
    all_lams = sorted({l for by in data.values() for l in by})
    ax.set_xticks(all_lams)
    ax.set_xticklabels([f"{l:g}" for l in all_lams])
    ax.set_xlabel("λ")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(title="student", fontsize=8)
    ax.set_title(f"REFILLED accuracy against λ: {meta['split']['dataset']}, overlap ratio "
                 f"{meta['split']['ratio'] * 100:g}%\n(mean{' ± std' if n_seeds > 1 else ''} over {n_seeds} seed(s))",
                 fontsize=9)
    fig.tight_layout()
    return save_png_pdf(fig, out)


def figure3(runs: list[Path], out: Path) -> list[Path]:
    """Stage-2 REFILLED runs (lambda = 1) at one or more ratios; pooled over seeds per ratio."""
    from sklearn.metrics import roc_auc_score

    by_ratio: dict[float, list] = {}
    for run in runs:
        s = read_json(Path(run) / "summary.json")
        rows = read_csv(Path(run) / "lambda_i.csv")
        by_ratio.setdefault(float(s["split"]["ratio"]), []).append((s, rows))
    plt = pyplot()
    ratios = sorted(by_ratio)
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.6 * len(ratios), 3.6), squeeze=False)
    letters = "abcdefgh"
    for ax, letter, ratio in zip(axes[0], letters, ratios):
        group = by_ratio[ratio]
        seen = [float(r["lambda_i"]) for _, rows in group for r in rows if r["seen"] == "1"]
        unseen = [float(r["lambda_i"]) for _, rows in group for r in rows if r["seen"] == "0"]
        lam = float(group[0][0]["params"]["lam"])
        bins = [lam * i / 20 for i in range(21)]
        ax.hist(seen, bins=bins, alpha=0.6, label=f"seen ({len(seen)})", color="C0")
        ax.hist(unseen, bins=bins, alpha=0.6, label=f"unseen ({len(unseen)})", color="C3")
        aucs = []
        for _, rows in group:
            y = [int(r["seen"]) for r in rows]
            if 0 < sum(y) < len(y):
                aucs.append(roc_auc_score(y, [float(r["lambda_i"]) for r in rows]))
        if aucs:
            auc = f"AUC {statistics.fmean(aucs):.3f}" + (f" ± {statistics.stdev(aucs):.3f}" if len(aucs) > 1 else "")
        else:
            auc = "AUC undefined (no unseen classes)"
        ax.set_title(f"({letter}) overlap ratio {ratio * 100:g}%: {auc}", fontsize=9)
        ax.set_xlabel(f"λ_i (λ = {lam:g})")
        ax.set_ylabel("training instances")
        ax.set_xlim(0, lam)
        ax.legend(fontsize=8, loc="upper left")
    s0 = by_ratio[ratios[0]][0][0]
    fig.suptitle(f"Histogram of λ_i: {s0['split']['dataset']}, student {s0['arch']}, "
                 f"{len(by_ratio[ratios[0]])} seed(s) pooled", fontsize=10)
    fig.tight_layout()
    return save_png_pdf(fig, out)


FIGURES = {"1": figure1, "2": figure2, "3": figure3}
