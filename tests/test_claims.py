"""`refilled claims` and `refilled gain-vs-data`: the intervals against the textbook formula,
the verdict rules, the pairing over seeds, and the files and errors a user sees."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from refilled.report import claims
from refilled.cli import main
from refilled.experiments.profile import ConfigError, gain_experiment, gain_points, load_profile

ROOT = Path(__file__).resolve().parents[1]
T975 = {2: 4.302653, 4: 2.776445}   # Student-t 97.5% quantiles (df 2, 4), from printed tables


def test_t_interval_is_the_textbook_formula():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, lo, hi = claims.t_interval(values)
    half = T975[4] * statistics.stdev(values) / math.sqrt(5)
    assert mean == 3.0 and lo == pytest.approx(3.0 - half, abs=1e-5) and hi == pytest.approx(3.0 + half, abs=1e-5)
    assert claims.t_interval([2.5]) == (2.5, None, None)


@pytest.mark.parametrize("lo,hi,threshold,above,expected", [
    (0.1, 2.0, 0.0, True, "holds"), (-2.0, -0.1, 0.0, True, "fails"), (-1.0, 1.0, 0.0, True, "inconclusive"),
    (None, None, 0.0, True, "inconclusive"), (0.6, 0.8, 0.5, True, "holds"), (0.4, 0.6, 0.5, True, "inconclusive"),
    (1.0, 2.5, 3.0, False, "holds"), (3.5, 4.0, 3.0, False, "fails"), (2.0, 3.5, 3.0, False, "inconclusive")])
def test_verdict_rule(lo, hi, threshold, above, expected):
    assert claims.verdict(lo, hi, threshold, above) == expected


@pytest.mark.parametrize("lo,hi,threshold,above", [
    (0.0, 1.0, 0.0, True), (-1.0, 0.0, 0.0, True), (0.5, 0.9, 0.5, True), (0.1, 0.5, 0.5, True),
    (2.0, 3.0, 3.0, False), (3.0, 4.0, 3.0, False)])
def test_an_interval_ending_on_the_threshold_is_inconclusive(lo, hi, threshold, above):
    # "wholly above/below" is strict: an interval that touches the threshold decides nothing
    assert claims.verdict(lo, hi, threshold, above) == "inconclusive"


def test_a_claim_holds_only_if_every_comparison_holds():
    assert claims.combine(["holds", "holds"]) == "holds"
    assert claims.combine(["holds", "inconclusive"]) == "inconclusive"
    assert claims.combine(["holds", "inconclusive", "fails"]) == "fails"
    assert claims.combine([]) == "inconclusive"


def write_long(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# accuracy of (method, arch, seed) at each ratio: refilled beats student by 1 + seed at r = 0
# and loses by 2 at r = 1 on wrn-a; on wrn-b the gaps are 3 and -2
GAP = {("0", "wrn-a"): lambda s: 1.0 + s, ("0", "wrn-b"): lambda s: 3.0, ("1", "wrn-a"): lambda s: -2.0,
       ("1", "wrn-b"): lambda s: -2.0 + 0.5 * s}


def table_rows(methods=("student", "refilled-minus", "refilled"), seeds=(0, 1, 2)) -> list[dict]:
    rows = []
    for ratio in ("0", "1"):
        for arch in ("wrn-a", "wrn-b"):
            for seed in seeds:
                base = 60.0 + 3 * seed
                for m in methods:
                    acc = base + (GAP[(ratio, arch)](seed) if m == "refilled" else 0.0) + \
                        (0.25 if m == "refilled-minus" else 0.0)
                    rows.append({"ratio": ratio, "method": m, "arch": arch, "seed": seed, "test_acc": acc})
    return rows


def test_claim_a_pairs_per_seed_after_averaging_over_students(tmp_path):
    rows = claims.read_rows(write_long(tmp_path / "t2.csv", table_rows()))
    got = {(c.scope, c.comparison): c for c in claims.claim_a(rows, "2", "t2.csv")}
    r0 = got[("table2 r=0", "refilled - student")]
    assert r0.per_seed == {s: pytest.approx(((1.0 + s) + 3.0) / 2) for s in (0, 1, 2)}
    row = r0.row()
    diffs = [2.0, 2.5, 3.0]
    half = T975[2] * statistics.stdev(diffs) / math.sqrt(3)
    assert row["mean"] == pytest.approx(2.5) and row["ci_low"] == pytest.approx(2.5 - half, abs=1e-3)
    assert row["verdict"] == "holds" and row["n_seeds"] == 3
    r1 = got[("table2 r=1", "refilled - student")].row()
    assert r1["mean"] == pytest.approx(statistics.fmean([-2.0 + 0.25 * s for s in (0, 1, 2)]))
    assert r1["verdict"] == "fails"
    # the paper column: the supplement's own mean gap over its four students at that ratio
    assert r0.paper == pytest.approx(statistics.fmean([82.60 - 81.02, 80.70 - 78.94, 80.18 - 78.98, 74.42 - 73.70]))


def test_claim_b_low_minus_high_overlap(tmp_path):
    rows = claims.read_rows(write_long(tmp_path / "t2.csv", table_rows()))
    overall, low_high = claims.claim_b(rows, "2", "t2.csv")
    gap = lambda ratio, s: statistics.fmean(GAP[(ratio, a)](s) for a in ("wrn-a", "wrn-b")) - 0.25
    assert overall.per_seed == {s: pytest.approx((gap("0", s) + gap("1", s)) / 2) for s in (0, 1, 2)}
    assert low_high.per_seed == {s: pytest.approx(gap("0", s) - gap("1", s)) for s in (0, 1, 2)}
    assert low_high.row()["verdict"] == "holds"


def gap_rows(gap: dict[str, float], arch: str = "wrn-a", seeds=(0, 1, 2)) -> list[dict]:
    """refilled beats refilled-minus by gap[ratio] + 0.1 * seed * (ratio's position) points."""
    return [{"ratio": ratio, "method": m, "arch": arch, "seed": s,
             "test_acc": 60.0 + (g + 0.1 * s * i if m == "refilled" else 0.0)}
            for i, (ratio, g) in enumerate(gap.items()) for s in seeds for m in ("refilled-minus", "refilled")]


def test_claim_b_splits_low_from_high_overlap_at_one_half(tmp_path):
    # r = 0 and 0.4 are low overlap, 0.5 and 0.6 high: (4 + 2)/2 - (1 + 0.5)/2 = 2.25 at seed 0;
    # the seed terms 0.1*s*(0, 1, 2, 3) add (0 + 0.1s)/2 - (0.2s + 0.3s)/2 = -0.2s
    rows = claims.read_rows(write_long(tmp_path / "t2.csv", gap_rows({"0": 4.0, "0.4": 2.0, "0.5": 1.0, "0.6": 0.5})))
    overall, low_high = claims.claim_b(rows, "2", "t2.csv")
    assert low_high.per_seed == {0: pytest.approx(2.25), 1: pytest.approx(2.05), 2: pytest.approx(1.85)}
    assert overall.per_seed == {s: pytest.approx(7.5 / 4 + 0.1 * s * 6 / 4) for s in (0, 1, 2)}
    assert low_high.paper is None          # Table 2 has no r = 0.5


@pytest.mark.parametrize("table,gap,paper", [
    # Table 1 (CUB), REFILLED - REFILLED^- over the four MobileNets, by hand from the supplement:
    # r = 0: (1.06 + 0.74 + 0.44 + 0.64)/4 = 0.72; r = 0.5: (1.11 + 0.96 + 1.32 + 0.71)/4 = 1.025
    ("1", {"0": 1.0, "0.5": 3.0}, 0.72 - 1.025),
    # Table 2 (CIFAR-100), over the four WRNs: r = 0: (0.81 + 0.96 + 0.58 + 0.40)/4 = 0.6875,
    # r = 0.4: (0.56 + 0.10 + 0.32 + 0.50)/4 = 0.37; r = 0.6: (0.64 + 0.00 + 0.73 + 0.78)/4 = 0.5375
    ("2", {"0": 1.0, "0.4": 3.0, "0.6": 0.5}, (0.6875 + 0.37) / 2 - 0.5375),
], ids=["table1", "table2"])
def test_claim_b_paper_value_is_low_minus_high_overlap(tmp_path, table, gap, paper):
    rows = claims.read_rows(write_long(tmp_path / "t.csv", gap_rows(gap)))
    _, low_high = claims.claim_b(rows, table, "t.csv")
    assert low_high.paper == pytest.approx(paper, abs=1e-9)
    assert low_high.paper < 0              # at these ratios the supplement's gap is larger at high overlap


def test_unpaired_runs_are_refused_with_the_file_named(tmp_path):
    rows = [r for r in table_rows() if not (r["method"] == "student" and r["seed"] == 2 and r["ratio"] == "0")]
    path = write_long(tmp_path / "t2.csv", rows)
    with pytest.raises(claims.ClaimsError, match="t2.csv.*different"):
        claims.claim_a(claims.read_rows(path), "2", str(path))


def test_claims_c_d_e(tmp_path):
    auc = write_long(tmp_path / "auc.csv", [{"ratio": "0.6", "seed": s, "auc": 0.7 + 0.01 * s} for s in range(4)]
                     + [{"ratio": "1", "seed": 0, "auc": ""}])
    c_half, c_strong = claims.claim_c(claims.read_rows(auc), "0.6")
    assert c_half.row()["verdict"] == "holds" and c_strong.row()["verdict"] == "fails"
    assert c_half.row()["paper"] == c_strong.row()["paper"] == 0.959     # the supplement, Figure 3's AUC
    t4 = write_long(tmp_path / "t4.csv", [{"ratio": "0", "k_hat": k, "arch": "wrn-a", "seed": s,
                                           "ncm_acc": 50 + s + (2.0 if k == "inf" else 0.0) + 0.1 * s * (k == "inf")}
                                          for k in ("1", "5", "inf") for s in range(3)])
    (d,) = claims.claim_d(claims.read_rows(t4), "t4.csv")
    assert d.per_seed == {s: pytest.approx(2.0 + 0.1 * s) for s in range(3)}
    assert d.paper == pytest.approx(32.69 - 30.54)
    summaries = []
    for lam, acc in {0.5: 70.0, 2.0: 75.0, 8.0: 71.0}.items():
        for s in range(3):
            p = tmp_path / f"lam{lam}" / f"seed{s}.json"
            p.parent.mkdir(exist_ok=True)
            p.write_text(json.dumps({"params": {"lam": lam}, "seed": s, "test_acc": (acc + 0.3 * s * (lam == 8)) / 100}))
            summaries.append(p)
    *best, spread = claims.claim_e(summaries)
    assert [c.comparison for c in best] == ["acc(lambda=2) - acc(lambda=0.5)", "acc(lambda=2) - acc(lambda=8)"]
    assert best[1].per_seed == {s: pytest.approx(4.0 - 0.3 * s) for s in range(3)}
    assert all(c.row()["verdict"] == "holds" for c in best)
    assert spread.per_seed == {s: pytest.approx(5.0) for s in range(3)} and spread.row()["verdict"] == "fails"


def test_cli_writes_csv_and_markdown_and_names_a_missing_file(tmp_path, capsys):
    t2 = write_long(tmp_path / "t2.csv", table_rows())
    out, md = tmp_path / "claims.csv", tmp_path / "claims.md"
    assert main(["claims", "--table", "2", str(t2), "--out", str(out), "--markdown", str(md)]) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert {r["claim"] for r in rows} == {"a", "b"} and len(rows) == 2 * 2 + 2
    text = md.read_text(encoding="utf-8")
    assert "| (a) |" in text and "**fails**" in text
    capsys.readouterr()
    assert main(["claims", "--table", "2", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x.csv"),
                 "--markdown", str(tmp_path / "x.md")]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.md").exists()


def test_gain_vs_data_pairs_per_seed_and_draws_the_figure(tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"ratio": 0.6}))
    runs, ncm = [], []
    for n in (10, 30):
        for s in range(3):
            for m, acc in (("student", 0.60 + 0.01 * s), ("refilled", 0.62 + 0.02 * s + 0.001 * n)):
                p = tmp_path / f"n{n}" / m / f"seed{s}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps({"data": {"per_class": n}, "split": {"ratio": 0.6}, "method": m, "seed": s,
                                         "test_acc": acc}))
                runs.append(p)
            q = tmp_path / f"ncm_n{n}_s{s}.json"
            q.write_text(json.dumps({"ncm_acc": 0.7, "per_class": n, "seed": s, "split": str(split)}))
            ncm.append(q)
    out, fig = tmp_path / "gain.csv", tmp_path / "gain"
    argv = ["gain-vs-data", "--summaries", *map(str, runs), "--teacher-ncm", *map(str, ncm), "--out", str(out),
            "--figure", str(fig)]
    assert main(argv) == 0
    rows = {(r["per_class"], r["quantity"]): r for r in csv.DictReader(open(out, encoding="utf-8"))}
    # gains at per_class 30: 2 + s + 3 points for seeds 0, 1, 2 -> 5, 6, 7: mean 6, s.d. 1
    gain30 = rows[("30", "refilled - student")]
    half = T975[2] * 1.0 / math.sqrt(3)
    assert (float(gain30["mean"]), float(gain30["ci_low"]), float(gain30["ci_high"])) == \
        pytest.approx((6.0, 6.0 - half, 6.0 + half), abs=1e-4)
    assert float(rows[("10", "student accuracy")]["mean"]) == pytest.approx(61.0)
    assert float(rows[("10", "teacher NCM on the student's classes")]["mean"]) == pytest.approx(70.0)
    assert (tmp_path / "gain.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "gain.pdf").stat().st_size > 0
    capsys.readouterr()
    assert main([*argv[:2], *map(str, runs[1:]), *argv[2 + len(runs):]]) == 2   # a student run missing
    assert "no student run at per_class 10" in capsys.readouterr().err
    twice = tmp_path / "twice.csv"
    assert main([*argv[:2], *map(str, runs), str(runs[0]), *argv[2 + len(runs):-4], "--out", str(twice),
                 "--figure", str(tmp_path / "twice")]) == 2
    assert f"{runs[0]}: a second run for per_class 10, ratio 0.6, student, seed 0" in capsys.readouterr().err
    assert not twice.exists() and not (tmp_path / "twice.png").exists()


def test_profiles_expand_the_sweep_into_experiments_sharing_the_teacher():
    cfg = load_profile(ROOT, "claims")
    g = cfg["gain_vs_data"]
    base = cfg["experiments"][g["experiment"]]
    points = gain_points(cfg)
    assert sorted(points) == sorted(g["per_class"])
    for n, exp in points.items():
        if n == base["per_class"]:      # the base experiment's own runs are that point: not trained twice
            assert exp == g["experiment"] and gain_experiment(n) not in cfg["experiments"]
            continue
        e = cfg["experiments"][exp]
        assert exp == gain_experiment(n)
        assert e["per_class"] == n and e["students"] == [g["arch"]] and e["teacher_of"] == g["experiment"]
        assert e["teacher"] == base["teacher"]
    assert base["per_class"] in points and len(cfg["seeds"]) >= 5


def test_a_sweep_point_the_base_does_not_cover_gets_its_own_experiment():
    cfg = load_profile(ROOT, "claims")
    base = cfg["experiments"][cfg["gain_vs_data"]["experiment"]]
    n = base["per_class"]
    # a ratio the base does not train: the point at the base's per_class is its own experiment
    wider = {**cfg, "gain_vs_data": {**cfg["gain_vs_data"], "ratios": [*base["ratios"], 0.55]}}
    assert gain_points(wider)[n] == gain_experiment(n)
    other_arch = {**cfg, "gain_vs_data": {**cfg["gain_vs_data"], "arch": "wrn-40-2"}}
    assert gain_points(other_arch)[n] == gain_experiment(n)


def test_a_sweep_beyond_the_data_pool_is_refused(tmp_path):
    import shutil

    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "workflow" / "schemas", tmp_path / "workflow" / "schemas")
    text = (tmp_path / "config" / "smoke.yaml").read_text().replace("per_class: [4, 8]", "per_class: [4, 800]")
    (tmp_path / "config" / "smoke.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"gain_vs_data.per_class: 800 > train_per_class 16"):
        load_profile(tmp_path, "smoke")


# ---- refilled reproduction: our cells beside the supplement's ----

def kendall_brute(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by counting pairs: (concordant - discordant) / sqrt((n0 - ties in x)(n0 - ties in y))."""
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    sign = lambda v: (v > 0) - (v < 0)
    s = sum(sign(x[i] - x[j]) * sign(y[i] - y[j]) for i, j in pairs)
    untied_x = sum(x[i] != x[j] for i, j in pairs)
    untied_y = sum(y[i] != y[j] for i, j in pairs)
    return s / math.sqrt(untied_x * untied_y)


def test_kendall_oracle_is_tau_b_on_tied_data():
    # by hand: pairs (0,1) (0,2) (0,3) concordant, (1,3) discordant, (1,2) tied in x, (2,3) tied in y:
    # tau-b = (3 - 1) / sqrt((6 - 1)(6 - 1)) = 0.4 (tau-a would be 2/6, tau-c 0.375)
    assert kendall_brute([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)


def test_reproduction_values_on_the_papers_setting(tmp_path):
    from refilled.report import supplement
    from refilled.report.reproduction import write_reproduction

    paper = supplement.value(2, "0.6", "wrn-40-2", "refilled")     # 80.66
    rows = [{"ratio": "0.6", "method": m, "arch": "wrn-40-2", "seed": s, "test_acc": v}
            for m, vals in (("refilled", [80.0, 81.0, 82.0]), ("student", [70.0, 70.5, 71.0])) for s, v in enumerate(vals)]
    long = write_long(tmp_path / "t2.csv", rows)
    values, orders = write_reproduction([("2", long, "cifar100", ["wrn-40-2"])], tmp_path / "r.csv", tmp_path / "r.md")
    assert orders == []
    got = {v["method"]: v for v in values}
    half = T975[2] * statistics.stdev([80.0, 81.0, 82.0]) / math.sqrt(3)
    assert got["refilled"]["ours_minus_paper"] == pytest.approx(81.0 - paper, abs=0.01)
    assert got["refilled"]["ours_ci_low"] == pytest.approx(81.0 - half, abs=0.01)
    assert got["refilled"]["paper_in_interval"] == "yes"             # 81.0 ± 2.48 holds the paper's 80.66
    assert got["student"]["paper_in_interval"] == "no"              # 70.5 ± 1.2 against the paper's 78.90
    assert "inside our 95% interval in 1 of the 2" in (tmp_path / "r.md").read_text(encoding="utf-8")


def test_reproduction_orderings_on_another_dataset(tmp_path):
    from refilled.report import supplement
    from refilled.report.reproduction import write_reproduction

    methods = ["student", "rkd", "aml", "refilled-emb", "refilled-minus", "refilled"]
    paper = {m: supplement.value(2, "0", "wrn-16-2", m) for m in methods}   # our 2nd student <-> the paper's 2nd
    ours = {m: 50.0 + i * 3.0 for i, m in enumerate(["aml", "student", "rkd", "refilled", "refilled-emb",
                                                     "refilled-minus"])}
    rows = [{"ratio": "0", "method": m, "arch": a, "seed": 0, "test_acc": ours[m] if a == "wrn-10-2" else 60.0 + i}
            for a in ("wrn-16-1", "wrn-10-2") for i, m in enumerate(methods)]
    long = write_long(tmp_path / "t2.csv", rows)
    values, orders = write_reproduction([("2", long, "fashion-mnist", ["wrn-16-1", "wrn-10-2"])], tmp_path / "r.csv",
                                        tmp_path / "r.md")
    assert values == []
    block = next(o for o in orders if o["student"] == "wrn-10-2")
    assert block["paper_student"] == "wrn-16-2" and block["methods"] == 6
    assert block["kendall_tau"] == pytest.approx(kendall_brute([ours[m] for m in methods],
                                                               [paper[m] for m in methods]), abs=1e-3)
    first = next(o for o in orders if o["student"] == "wrn-16-1")
    assert first["paper_student"] == "wrn-40-2"
    assert first["kendall_tau"] == pytest.approx(kendall_brute([60.0 + i for i in range(6)],
                                                               [supplement.value(2, "0", "wrn-40-2", m) for m in methods]),
                                                 abs=1e-3)
    assert list(csv.DictReader(open(tmp_path / "r.csv", encoding="utf-8")))[0]["comparison"] == "ordering"


@pytest.mark.parametrize("table,teacher,student,paper", [
    # the paper's own students map onto themselves
    *[("2", "wrn-40-2", a, a) for a in ("wrn-40-2", "wrn-16-2", "wrn-40-1", "wrn-16-1")],
    *[("3", "wrn-28-4", a, a) for a in ("wrn-16-4", "wrn-28-2", "wrn-16-2")],
    # CPU size: the same deeper/shallower, wider/thinner relation to the teacher
    ("2", "wrn-16-2", "wrn-10-2", "wrn-16-2"), ("2", "wrn-16-2", "wrn-16-1", "wrn-40-1"),
    ("2", "wrn-16-2", "wrn-10-1", "wrn-16-1"), ("3", "wrn-16-2", "wrn-16-1", "wrn-28-2"),
    ("3", "wrn-16-2", "wrn-10-1", "wrn-16-2"), ("3", "wrn-16-2", "wrn-10-2", "wrn-16-4"),
    ("1", "mobilenet-1.0", "mobilenet-0.25", "mobilenet-0.25"), ("1", "mobilenet-0.5", "mobilenet-0.25", "mobilenet-0.5"),
    # no paper student is as deep as its teacher and wider, nor a WRN under a MobileNet
    ("2", "wrn-16-1", "wrn-16-2", None), ("2", "mobilenet-1.0", "wrn-16-1", None),
])
def test_paper_counterpart_keeps_the_students_relation_to_the_teacher(table, teacher, student, paper):
    from refilled.report.reproduction import paper_counterpart

    assert paper_counterpart(table, student, teacher) == paper


def test_reproduction_pairs_each_student_with_its_named_counterpart(tmp_path):
    from refilled.report import supplement
    from refilled.report.reproduction import write_reproduction

    methods = ["student", "rkd", "aml", "refilled-emb", "refilled-minus", "refilled"]
    ours = {m: 50.0 + i * 3.0 for i, m in enumerate(["aml", "student", "rkd", "refilled", "refilled-emb",
                                                     "refilled-minus"])}
    rows = [{"ratio": "0", "method": m, "arch": a, "seed": 0, "test_acc": ours[m]}
            for a in ("wrn-10-2", "wrn-10-3") for m in methods]
    long = write_long(tmp_path / "t2.csv", rows)
    _, orders = write_reproduction([("2", long, "fashion-mnist", ["wrn-10-2=wrn-16-2", "wrn-10-3="])],
                                   tmp_path / "r.csv", tmp_path / "r.md")
    assert [(o["student"], o["paper_student"]) for o in orders] == [("wrn-10-2", "wrn-16-2")]   # not the 1st (position); wrn-10-3: none
    assert orders[0]["kendall_tau"] == pytest.approx(
        kendall_brute([ours[m] for m in methods], [supplement.value(2, "0", "wrn-16-2", m) for m in methods]), abs=1e-3)
    with pytest.raises(claims.ClaimsError, match="'wrn-10-2' is not one of the supplement's students"):
        write_reproduction([("2", long, "fashion-mnist", ["wrn-10-2=wrn-10-2"])], tmp_path / "r.csv", tmp_path / "r.md")


def test_reproduction_one_seed_cell_has_no_interval(tmp_path):
    from refilled.report.reproduction import write_reproduction

    rows = [{"ratio": "0.6", "method": m, "arch": "wrn-40-2", "seed": s, "test_acc": v}
            for m, vals in (("refilled", [80.0]), ("student", [70.0, 70.5, 71.0])) for s, v in enumerate(vals)]
    long = write_long(tmp_path / "t2.csv", rows)
    values, _ = write_reproduction([("2", long, "cifar100", ["wrn-40-2"])], tmp_path / "r.csv", tmp_path / "r.md")
    one = next(v for v in values if v["method"] == "refilled")
    assert (one["n_seeds"], one["ours_mean"], one["ours_ci_low"], one["ours_ci_high"], one["paper_in_interval"]) == \
        (1, 80.0, "", "", "")
    assert one["ours_minus_paper"] == pytest.approx(80.0 - 80.66)
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "inside our 95% interval in 0 of the 1 cells that have one" in md
    assert "| 2 | 0.6 | wrn-40-2 | refilled |  | 80.0 | — | 80.66 | -0.66 | — |" in md


@pytest.mark.parametrize("bounds", [(80.66, 82.0), (79.0, 80.66)])
def test_reproduction_paper_value_on_a_bound_is_inside(tmp_path, monkeypatch, bounds):
    # the interval is closed: the supplement's 80.66 exactly on either end counts as inside
    import refilled.report.reproduction as reproduction

    monkeypatch.setattr(reproduction, "t_interval", lambda values: (81.0, *bounds))
    rows = [{"ratio": "0.6", "method": "refilled", "arch": "wrn-40-2", "seed": s, "test_acc": 81.0} for s in range(3)]
    long = write_long(tmp_path / "t2.csv", rows)
    (value,), _ = reproduction.write_reproduction([("2", long, "cifar100", ["wrn-40-2"])], tmp_path / "r.csv",
                                                  tmp_path / "r.md")
    assert value["paper"] == 80.66 and value["paper_in_interval"] == "yes"


def test_reproduction_puts_the_authors_networks_beside_the_papers_values(tmp_path):
    # the paper profile's students are the authors' networks (wrn-authors-40-2 is the paper's
    # WRN-(40,2)): their cells are compared by value, Table 4 included, not by ordering
    from refilled.report.reproduction import write_reproduction

    t2 = write_long(tmp_path / "t2.csv", [{"ratio": "0.6", "method": "refilled", "arch": "wrn-authors-40-2",
                                           "seed": s, "test_acc": 80.0 + s} for s in range(3)])
    t4 = write_long(tmp_path / "t4.csv", [{"ratio": "0", "method": "stage1", "arch": "mobilenet-authors-1.0",
                                           "seed": s, "k_hat": "inf", "ncm_acc": 50.0} for s in range(3)])
    values, orders = write_reproduction([("2", t2, "cifar100", ["wrn-authors-40-2=wrn-40-2"]),
                                         ("4", t4, "cub200", ["mobilenet-authors-1.0=mobilenet-1.0"])],
                                        tmp_path / "r.csv", tmp_path / "r.md")
    assert orders == []
    by_table = {v["table"]: v for v in values}
    # the supplement's Table 2, r = .6, WRN-(40,2), REFILLED: 80.66; ours 80, 81, 82 -> mean 81
    assert by_table["2"]["paper"] == 80.66 and by_table["2"]["ours_mean"] == 81.0
    assert by_table["2"]["student"] == "wrn-authors-40-2"
    assert by_table["4"]["paper"] == 32.69        # Table 4, r = 0, MobileNet-1.0, K = inf


def test_reproduction_tau_is_tau_b_with_ties_on_both_sides(tmp_path):
    from refilled.report.reproduction import write_reproduction

    methods = ["student", "rkd", "aml", "refilled-emb", "refilled-minus", "refilled"]
    # Table 2, r = .6, WRN-(16,2): 76.37 76.20 76.45 76.90 76.66 76.66 (REFILLED^- and REFILLED tied);
    # ours tie Student and RKD
    ours = dict(zip(methods, [50.0, 50.0, 52.0, 53.0, 54.0, 55.0]))
    rows = [{"ratio": "0.6", "method": m, "arch": "wrn-10-2", "seed": 0, "test_acc": ours[m]} for m in methods]
    long = write_long(tmp_path / "t2.csv", rows)
    _, (block,) = write_reproduction([("2", long, "fashion-mnist", ["wrn-10-2=wrn-16-2"])], tmp_path / "r.csv",
                                     tmp_path / "r.md")
    # by hand over the 15 pairs: 11 concordant, 2 discordant (REFILLED^EMB against REFILLED^- and REFILLED),
    # 1 tied in ours (Student, RKD), 1 tied in the paper's: tau-b = 9 / sqrt(14 * 14) = 0.643
    # (tau-a 0.6, tau-c 0.625, ties counted as discordant 0.467)
    assert block["kendall_tau"] == 0.643
    assert kendall_brute(list(ours.values()), [76.37, 76.20, 76.45, 76.90, 76.66, 76.66]) == pytest.approx(9 / 14)
    assert block["ours_order"] == "refilled > refilled-minus > refilled-emb > aml > student > rkd"
    assert block["paper_order"] == "refilled-emb > refilled-minus > refilled > aml > student > rkd"


def test_reproduction_all_tied_ours_has_no_tau(tmp_path):
    from refilled.report.reproduction import write_reproduction

    methods = ["student", "rkd", "aml", "refilled-emb", "refilled-minus", "refilled"]
    rows = [{"ratio": "0", "method": m, "arch": "wrn-10-2", "seed": 0, "test_acc": 50.0} for m in methods]
    long = write_long(tmp_path / "t2.csv", rows)
    _, (block,) = write_reproduction([("2", long, "fashion-mnist", ["wrn-10-2=wrn-16-2"])], tmp_path / "r.csv",
                                     tmp_path / "r.md")
    assert block["kendall_tau"] == "" and block["methods"] == 6
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "mean tau over 0 blocks: n/a" in md and "| n/a (ours tied) |" in md
    assert list(csv.DictReader(open(tmp_path / "r.csv", encoding="utf-8")))[0]["kendall_tau"] == ""
