"""What the figures show (src/refilled/report/figures.py), built from planted run directories.

Each figure is drawn from metrics.csv, summary.json and lambda_i.csv files written here with
known numbers; the Figure object is taken where the code saves it, and its plotted data are
compared with values computed here by hand:

- Figure 1: the stage-1 runs are the 1st, 3rd, ... directories and the stage-2 runs the
  2nd, 4th, ...; each line is the mean over seeds per epoch (epochs without a value, e.g. not
  evaluated, left out); with more than one seed a min-max band, and the title says so.
- Figure 2: one line per student, x = the sorted lambdas, y = mean test accuracy (%) over
  seeds, error bars = the sample standard deviation.
- Figure 3: one panel per overlap ratio (sorted); the seen and unseen histograms count the
  pooled lambda_i of seen and unseen instances in 20 bins over [0, lambda]; the title gives
  the mean ± std over runs of each run's AUC (computed here by counting pairs), or says it is
  undefined when no class is unseen.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

import refilled.report.figures as figures

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn (matplotlib Figure objects), in order; the files are still written."""
    figs = []
    save = figures.save_png_pdf

    def keep(fig, out):
        figs.append(fig)
        return save(fig, out)

    monkeypatch.setattr(figures, "save_png_pdf", keep)
    yield figs
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _summary(run: Path, arch="wrn-16-1", lam=2.0, ratio=0.5, seed=0, test_acc=0.5, dataset="cifar-100") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(json.dumps({
        "method": "refilled", "task": "student", "arch": arch, "seed": seed, "test_acc": test_acc,
        "split": {"dataset": dataset, "ratio": ratio}, "params": {"lam": lam}}))


def _mean(xs):
    return sum(xs) / len(xs)


def _sample_std(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _axis(fig, ylabel: str):
    found = [ax for ax in fig.axes if ax.get_ylabel() == ylabel]
    assert len(found) == 1, [ax.get_ylabel() for ax in fig.axes]
    return found[0]


def _band(ax) -> dict[float, tuple[float, float]]:
    """{x: (lowest y, highest y)} of the one fill_between band on `ax`."""
    assert len(ax.collections) == 1, ax.collections
    out: dict[float, list[float]] = {}
    for path in ax.collections[0].get_paths():
        for x, y in path.vertices:
            out.setdefault(round(float(x), 9), []).append(float(y))
    return {x: (min(v), max(v)) for x, v in out.items()}


def _close(a, b):
    assert len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-9)
                                    for x, y in zip(a, b)), (list(a), list(b))


# ------------------------------------------------------------------------------------------------
# Figure 1
# ------------------------------------------------------------------------------------------------

# per seed: stage-1 (cm per epoch, ncm_acc evaluated at epochs 2 and 3 only), stage-2 (ce, teach, test_acc)
FIG1 = [
    {"cm": [3.0, 2.0, 1.5], "ncm": [None, 0.40, 0.50],
     "ce": [1.0, 0.8, 0.6, 0.5], "teach": [0.3, 0.2, 0.1, 0.1], "acc": [0.50, 0.55, 0.60, 0.65]},
    {"cm": [2.0, 1.0, 0.5], "ncm": [None, 0.60, 0.70],
     "ce": [1.2, 1.0, 0.8, 0.7], "teach": [0.5, 0.4, 0.3, 0.3], "acc": [0.70, 0.75, 0.80, 0.85]},
]


def _figure1_runs(tmp: Path, seeds: list[dict]) -> list[Path]:
    runs = []
    for i, d in enumerate(seeds):
        s1, s2 = tmp / f"stage1-s{i}", tmp / f"stage2-s{i}"
        _write_csv(s1 / "metrics.csv", [{"epoch": e + 1, "lr": 0.1, "cm": d["cm"][e],
                                          "ncm_acc": "" if d["ncm"][e] is None else d["ncm"][e]}
                                         for e in range(len(d["cm"]))])
        _write_csv(s2 / "metrics.csv", [{"epoch": e + 1, "lr": 0.1, "ce": d["ce"][e], "teach": d["teach"][e],
                                          "test_acc": d["acc"][e]} for e in range(len(d["ce"]))])
        _summary(s2, arch="wrn-16-1", lam=2.0, ratio=0.5, seed=i)
        runs += [s1, s2]                    # the command's order: stage 1 then stage 2, per seed
    return runs


def test_figure1_lines_are_per_epoch_means_of_the_paired_runs_with_a_min_max_band(tmp_path, drawn):
    paths = figures.figure1(_figure1_runs(tmp_path, FIG1), tmp_path / "fig1")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    fig, = drawn
    per_epoch = lambda key, scale=1.0: [scale * _mean([s[key][e] for s in FIG1]) for e in range(len(FIG1[0][key]))]
    ax1 = _axis(fig, "stage-1 loss")
    cm, = ax1.lines
    _close(cm.get_xdata(), [1, 2, 3])
    _close(cm.get_ydata(), per_epoch("cm"))                       # 2.5, 1.5, 1.0
    band = _band(ax1)
    for e in range(3):
        assert band[float(e + 1)] == pytest.approx((min(s["cm"][e] for s in FIG1), max(s["cm"][e] for s in FIG1)))
    ncm, = _axis(fig, "NCM accuracy (%)").lines
    _close(ncm.get_xdata(), [2, 3])                              # epoch 1 was not evaluated
    _close(ncm.get_ydata(), [100 * _mean([s["ncm"][e] for s in FIG1]) for e in (1, 2)])   # 50, 60
    ax2 = _axis(fig, "loss")
    ce, teach = ax2.lines
    _close(ce.get_xdata(), [1, 2, 3, 4])
    _close(ce.get_ydata(), per_epoch("ce"))
    _close(teach.get_ydata(), per_epoch("teach"))
    assert ce.get_label() == "cross-entropy" and teach.get_label().startswith("teaching term")
    assert len(ax2.collections) == 2                              # a band per line
    acc, = _axis(fig, "test accuracy (%)").lines
    _close(acc.get_ydata(), per_epoch("acc", 100))               # 60, 65, 70, 75
    band = _band(_axis(fig, "test accuracy (%)"))
    assert band[4.0] == pytest.approx((65.0, 85.0))
    title = fig._suptitle.get_text()
    assert "cifar-100" in title and "overlap ratio 50%" in title and "student wrn-16-1" in title
    assert "λ = 2" in title and "2 seed(s) (band: min–max)" in title


def test_figure1_with_one_seed_has_no_band(tmp_path, drawn):
    figures.figure1(_figure1_runs(tmp_path, FIG1[1:]), tmp_path / "fig1")
    fig, = drawn
    ax1 = _axis(fig, "stage-1 loss")
    _close(ax1.lines[0].get_ydata(), FIG1[1]["cm"])
    assert not ax1.collections and not _axis(fig, "loss").collections
    assert "1 seed(s)" in fig._suptitle.get_text() and "band" not in fig._suptitle.get_text()


def test_figure1_needs_pairs(tmp_path):
    runs = _figure1_runs(tmp_path, FIG1)
    with pytest.raises(ValueError, match="pairs of run directories"):
        figures.figure1(runs[:3], tmp_path / "fig1")


# ------------------------------------------------------------------------------------------------
# Figure 2
# ------------------------------------------------------------------------------------------------


def test_figure2_is_mean_and_sample_std_per_lambda_per_student(tmp_path, drawn):
    acc = {}                                  # (arch, lam) -> test accuracies (fraction) over seeds
    for i, arch in enumerate(("wrn-16-1", "wrn-10-2")):
        for j, lam in enumerate((4.0, 0.5, 1.0, 2.0)):
            acc[(arch, lam)] = [0.40 + 0.1 * i + 0.02 * j + d for d in (0.0, 0.03, -0.01)]
    runs = []
    for (arch, lam), values in acc.items():
        for seed, v in enumerate(values):
            run = tmp_path / f"{arch}-l{lam:g}-s{seed}"
            _summary(run, arch=arch, lam=lam, seed=seed, test_acc=v)
            runs.append(run)
    random.Random(0).shuffle(runs)            # the order of the runs must not matter
    figures.figure2(runs, tmp_path / "fig2")
    fig, = drawn
    ax, = fig.axes
    assert len(ax.containers) == 2
    lams = [0.5, 1.0, 2.0, 4.0]
    for container in ax.containers:
        arch = container.get_label()
        line, _, (bars,) = container.lines
        _close(line.get_xdata(), lams)
        _close(line.get_ydata(), [100 * _mean(acc[(arch, l)]) for l in lams])
        segments = bars.get_segments()        # one vertical bar per lambda: (x, mean - std) to (x, mean + std)
        assert len(segments) == len(lams)
        for seg, l in zip(segments, lams):
            (x0, lo), (x1, hi) = seg
            m, sd = 100 * _mean(acc[(arch, l)]), 100 * _sample_std(acc[(arch, l)])
            assert x0 == x1 == pytest.approx(l)
            assert (lo, hi) == pytest.approx((m - sd, m + sd))
    assert {c.get_label() for c in ax.containers} == {"wrn-16-1", "wrn-10-2"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "1", "2", "4"]
    assert "overlap ratio 50%" in ax.get_title() and "(mean ± std over 3 seed(s))" in ax.get_title()


def test_figure2_with_one_seed_has_no_error_bars(tmp_path, drawn):
    runs = []
    for lam, v in ((1.0, 0.6), (2.0, 0.7)):
        _summary(tmp_path / f"l{lam:g}", lam=lam, test_acc=v)
        runs.append(tmp_path / f"l{lam:g}")
    figures.figure2(runs, tmp_path / "fig2")
    ax, = drawn[0].axes
    line, caps, bars = ax.containers[0].lines
    _close(line.get_ydata(), [60.0, 70.0])
    assert not bars and "over 1 seed(s)" in ax.get_title() and "±" not in ax.get_title()


# ------------------------------------------------------------------------------------------------
# Figure 3
# ------------------------------------------------------------------------------------------------


def _lambda_values(rng: random.Random, n: int, lam: float, centre: float) -> list[float]:
    """n values in (0, lam) around centre * lam, none within 1e-3 of a bin edge (lam / 20)."""
    out = []
    while len(out) < n:
        v = rng.gauss(centre, 0.2) * lam
        k = v / (lam / 20)
        if 0 < v < lam and abs(k - round(k)) > 1e-3 * 20:
            out.append(round(v, 6))
    return out


def _auc(seen: list[float], unseen: list[float]) -> float:
    """P(a seen instance scores above an unseen one), ties counting one half."""
    wins = sum(1.0 if s > u else 0.5 if s == u else 0.0 for s in seen for u in unseen)
    return wins / (len(seen) * len(unseen))


def test_figure3_histograms_count_seen_and_unseen_lambda_i_and_titles_give_the_auc(tmp_path, drawn):
    lam = 1.0
    rng = random.Random(5)
    planted = {}                                      # ratio -> [(seen values, unseen values) per seed]
    runs = []
    for ratio, n_unseen in ((0.5, 30), (0.25, 45), (1.0, 0)):   # at ratio 1 every class is seen
        planted[ratio] = []
        for seed in range(2):
            seen, unseen = _lambda_values(rng, 40, lam, 0.65), _lambda_values(rng, n_unseen, lam, 0.35)
            planted[ratio].append((seen, unseen))
            run = tmp_path / f"r{ratio:g}-s{seed}"
            _summary(run, lam=lam, ratio=ratio, seed=seed)
            rows = [{"index": i, "label": 0, "seen": 1, "lambda_i": v} for i, v in enumerate(seen)]
            rows += [{"index": len(seen) + i, "label": 1, "seen": 0, "lambda_i": v} for i, v in enumerate(unseen)]
            rng.shuffle(rows)
            _write_csv(run / "lambda_i.csv", rows)
            runs.append(run)
    figures.figure3(runs[::-1], tmp_path / "fig3")
    fig, = drawn
    axes = fig.axes
    assert len(axes) == 3
    edges = [lam * i / 20 for i in range(21)]
    count = lambda values: [sum(lo <= v < hi for v in values) for lo, hi in zip(edges, edges[1:])]
    for ax, letter, ratio in zip(axes, "abc", (0.25, 0.5, 1.0)):         # panels in ratio order
        seen = [v for s, _ in planted[ratio] for v in s]
        unseen = [v for _, u in planted[ratio] for v in u]
        heights = [p.get_height() for p in ax.patches]
        assert heights == count(seen) + count(unseen), ratio      # seen bars first, then unseen
        assert [round(p.get_x(), 9) for p in ax.patches[:20]] == [round(e, 9) for e in edges[:20]]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"seen ({len(seen)})",
                                                                    f"unseen ({len(unseen)})"]
        assert ax.get_xlim() == pytest.approx((0, lam))
        title = ax.get_title()
        assert title.startswith(f"({letter}) overlap ratio {ratio * 100:g}%: "), title
        if unseen:
            aucs = [_auc(s, u) for s, u in planted[ratio]]
            assert title.endswith(f"AUC {_mean(aucs):.3f} ± {_sample_std(aucs):.3f}"), (title, aucs)
            assert 0.5 < _mean(aucs) < 1.0                           # the planted groups overlap, but differ
        else:
            assert title.endswith("AUC undefined (no unseen classes)"), title
    assert "2 seed(s) pooled" in fig._suptitle.get_text()
