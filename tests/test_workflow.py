"""Tests of the Snakemake workflow and its DVC wrapper (Snakefile, workflow/, config/, dvc.yaml).

- The dry run of results/table2.csv (and of `all`) on the `paper` profile has exactly the
  jobs its grid implies, counted here from config/paper.yaml by an enumeration of our own.
- A wrong key, type or value in a profile stops the run with a message naming it.
- The Snakefile limits the GPU jobs at once to GPUs x slots per GPU (`refilled pin`
  itself is tested in tests/test_pin.py).
- Every output dvc.yaml declares is made by the Snakemake DAG, and everything the DAG
  makes is under a DVC output.
- End to end on the `smoke` profile, in a temporary clone of the working tree: every
  table and figure exists with the rows and columns its config implies, every table cell
  is the mean of the summary.json values it traces to, the report is one page with all of
  them; `dvc repro` reaches the same outputs; a push/pull round trip through the default
  local remote loses nothing (checksums equal); after `snakemake --touch` a dry run has
  nothing to do.
- On the same clone: `dvc metrics show` holds every table cell (recomputed here from the long
  CSVs), `dvc exp run -S profile=smoke` / `dvc exp show` list the experiment with them, and
  headless Chromium (tests/chromium.py) renders the report and the `dvc plots show` page with
  every table, figure, curve and caption and no JavaScript error.

The end-to-end fixture takes a few minutes on 2 CPU cores (marked slow; CI runs it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import chromium
from snakemake_output import job_counts
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "src"))
from refilled.methods import CATALOG, table_methods  # noqa: E402  (torch-free)

METHODS = table_methods()                     # the rows of Tables 1 and 2, from the catalog
LABELS = {m: CATALOG[m].label for m in METHODS}
TABLE_FILES = [f"results/table{t}{s}" for t in (1, 2, 3, 4, "_h") for s in (".csv", "_long.csv", ".md")] + \
    ["results/reproduction.csv", "results/reproduction.md"]
FIGURE_FILES = [f"figures/{n}.{e}" for n in ("figure1_convergence", "figure2_lambda_sweep", "figure3_lambda_hist")
                for e in ("png", "pdf")]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(cmd: list, cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def snakemake(args: list, snakefile: Path = ROOT / "Snakefile", workdir: Path | None = None, **kw):
    """`args` starts with the target(s), then options (--config takes every word after it)."""
    n = next((i for i, a in enumerate(args) if str(a).startswith("-")), len(args))
    extra = ["-s", snakefile] + (["-d", workdir] if workdir else [])
    return run([BIN / "snakemake", *args[:n], *extra, *args[n:]], cwd=workdir or ROOT, **kw)




def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


def g(x) -> str:
    """A number as the workflow writes it in paths: 0.5 -> '0.5', 1.0 -> '1'."""
    return f"{float(x):g}"


# ------------------------------------------------------------------------------------------------
# The grid, enumerated independently of the Snakefile's helpers
# ------------------------------------------------------------------------------------------------


def expected_runs(cfg: dict, targets: set[str]) -> dict[str, set]:
    """Distinct runs per rule that the targets ("table1", "table2", "table4", "figures", "table_h") need."""
    seeds, lam, khat = cfg["seeds"], float(cfg["lam"]), str(cfg["k_hat"])
    ex = cfg["experiments"]
    runs = {k: set() for k in ("teacher", "train", "split", "prepare_data")}   # train: every student run

    def student_task(e, r, a, s):
        runs["teacher"].add((e, s))
        runs["split"].add((ex[e]["dataset"], ex[e]["classes_per_task"], g(r), s))
        runs["split"].add((ex[e]["dataset"], ex[e]["classes_per_task"], g(0), s))   # the teacher's split
        runs["prepare_data"].add(ex[e]["dataset"])

    def stage1(e, r, a, s, k=khat):
        student_task(e, r, a, s)
        runs["train"].add(("stage1", e, g(r), a, s, str(k)))

    def stage2(e, r, a, s, v, l=lam, joint=""):
        stage1(e, r, a, s)
        runs["train"].add((v + joint, e, g(r), a, s, g(l)))

    for t in ("table1", "table2"):
        if t in targets:
            for r in ex[t]["ratios"]:
                for a in ex[t]["students"]:
                    for s in seeds:
                        for m in METHODS:
                            if CATALOG[m].starts_from == "stage1":
                                stage2(t, r, a, s, m)
                            else:
                                student_task(t, r, a, s)
                                runs["train"].add((m, t, g(r), a, s))
    if "table3" in targets:   # standard KD: every class at r = 1, which is also the teacher's split
        e = ex["table3"]
        for a in e["students"]:
            for s in seeds:
                runs["teacher"].add(("table3", s))
                runs["split"].add((e["dataset"], e["classes_per_task"], g(1), s))
                runs["prepare_data"].add(e["dataset"])
                for m in e["methods"]:
                    runs["train"].add((m, "table3", a, s))
                    first = CATALOG[m].starts_from   # fitnet-hint before fitnet, stage1 before refilled-std
                    if first:
                        runs["train"].add((first, "table3", a, s))
    if "table4" in targets:
        t4 = cfg["table4"]
        for r in t4["ratios"]:
            for k in t4["k_hats"]:
                for s in seeds:
                    stage1(t4["experiment"], r, t4["arch"], s, k)
    if "table_h" in targets:   # joint-head runs of the table_h methods, and a reference beside each plain student
        th = cfg["table_h"]
        runs["joint_reference"] = set()
        for t in th["experiments"]:
            for r in th["ratios"] or ex[t]["ratios"]:
                for a in th["students"] or ex[t]["students"]:
                    for s in seeds:
                        student_task(t, r, a, s)
                        runs["train"].add(("student", t, g(r), a, s))          # the reference's plain student
                        runs["joint_reference"].add((t, g(r), a, s))
                        for m in th["methods"]:
                            if CATALOG[m].starts_from == "stage1":
                                stage2(t, r, a, s, m, joint="-joint")
                            else:
                                runs["train"].add((m + "-joint", t, g(r), a, s))
    if "figures" in targets:
        f1, f2, f3 = cfg["figure1"], cfg["figure2"], cfg["figure3"]
        stage2(f1["experiment"], f1["ratio"], f1["arch"], f1["seed"], "refilled")
        for a in ex[f2["experiment"]]["students"]:
            for l in f2["lams"]:
                for s in seeds:
                    stage2(f2["experiment"], f2["ratio"], a, s, "refilled", l)
        for r in f3["ratios"]:
            for s in seeds:
                stage2(f3["experiment"], r, f3["arch"], s, "refilled", f3["lam"])
    return runs


# ------------------------------------------------------------------------------------------------
# Dry runs on the paper profile: the job counts the grid implies
# ------------------------------------------------------------------------------------------------


def test_dry_run_table2_paper_has_exactly_the_grid(tmp_path):
    out = snakemake(["results/table2.csv", "-n", "--quiet", "rules", "--config", "profile=paper"], workdir=tmp_path)
    counts = job_counts(out.stdout + out.stderr)
    cfg = profile("paper")
    e = cfg["experiments"]["table2"]
    n_seeds, n_ratios, n_archs = len(cfg["seeds"]), len(e["ratios"]), len(e["students"])
    assert (n_seeds, n_ratios, n_archs) == (3, 6, 4)
    expected = {
        "prepare_data": 1,                              # CIFAR-100, verified once
        "split": n_ratios * n_seeds,                    # ratio 0 (the teacher's split) is one of the six
        "teacher": n_seeds,                             # one teacher per seed serves every ratio
        # stage 1 (shared by the three REFILLED rows) + REFILLED, REFILLED-, REFILLED^EMB + student, RKD, AML
        "train": (1 + 3 + 3) * n_ratios * n_archs * n_seeds,
        "table2": 1,
    }
    assert counts == expected
    assert sum(counts.values()) == 1 + 18 + 3 + 72 + 216 + 216 + 1
    # the independent enumeration agrees
    runs = expected_runs(cfg, {"table2"})
    assert {k: len(v) for k, v in runs.items()} == {k: v for k, v in expected.items() if k != "table2"}


def test_dry_run_everything_paper_shares_runs_across_tables_and_figures(tmp_path):
    out = snakemake(["all", "-n", "--quiet", "rules", "--config", "profile=paper"], workdir=tmp_path)
    counts = job_counts(out.stdout + out.stderr)
    runs = expected_runs(profile("paper"), {"table1", "table2", "table3", "table4", "figures", "table_h"})
    expected = {k: len(v) for k, v in runs.items()}
    expected.update({r: 1 for r in ("table1", "table2", "table3", "table4", "table_h", "reproduction", "figure1",
                                    "figure2", "figure3", "lambda_auc", "metrics_json", "figure1_data",
                                    "figure2_data", "all")})
    assert counts == expected
    # Table 4 adds K-hat 1 and 5 (K-hat inf is Table 1's stage 1); Figure 2 adds lambda != 2;
    # Figure 1 reuses a Table-2 run; Figure 3 adds lambda = 1 at two ratios; Table H adds a
    # joint-head Student, REFILLED- and REFILLED run per cell of Tables 1 and 2 (their stage 1
    # is the plain one) and a reference per cell (from the plain Student run: no training).
    cells = (5 + 6) * 4 * 3
    stage1 = cells + 2 * 2 * 3
    stage2 = cells * 3 + 4 * 4 * 3 + 2 * 3
    baselines = cells * 3
    table3 = 3 * 3 * (7 + 2)   # 3 students x 3 seeds x (7 rows + FitNet's hint stage + REFILLED's stage 1)
    assert counts["train"] == stage1 + stage2 + baselines + 3 * cells + table3
    assert counts["joint_reference"] == cells


def test_training_rules_declare_one_gpu(tmp_path):
    out = snakemake(["results/table2.csv", "-n", "--config", "profile=paper"], workdir=tmp_path)
    text = out.stdout + out.stderr
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", text)
    seen = set()
    for block in blocks:
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        rule = m.group(1)
        if rule in ("teacher", "train"):
            assert re.search(r"resources:.*\bgpu=1\b", block), block[:600]
            seen.add(rule)
    assert seen == {"teacher", "train"}


# ------------------------------------------------------------------------------------------------
# Configuration validation: a wrong key, type or value stops the run and names it
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def workflow_copy(tmp_path):
    """The workflow (Snakefile, workflow/, config/, params.yaml, src/refilled) in a temp dir."""
    dst = tmp_path / "wf"
    dst.mkdir()
    shutil.copy(ROOT / "Snakefile", dst)
    shutil.copy(ROOT / "params.yaml", dst)
    for d in ("workflow", "config"):
        shutil.copytree(ROOT / d, dst / d)
    shutil.copytree(ROOT / "src" / "refilled", dst / "src" / "refilled", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _bad_profile(wf: Path, edit) -> None:
    cfg = yaml.safe_load((wf / "config" / "smoke.yaml").read_text())
    edit(cfg)
    (wf / "config" / "bad.yaml").write_text(yaml.safe_dump(cfg))


BAD = {
    "unknown top-level key": (lambda c: c.update(epochs=3), ["unknown key", "'epochs'"]),
    "unknown nested key": (lambda c: c["experiments"]["table2"]["teacher"].update(lr=0.1),
                           ["unknown key", "'lr'", "experiments.table2.teacher"]),
    "wrong type": (lambda c: c.update(batch_size="large"), ["batch_size", "'large' is not of type 'integer'"]),
    "value out of range": (lambda c: c.update(seeds=[-1]), ["seeds[0]", "-1"]),
    "value not allowed": (lambda c: c.update(device="tpu"), ["device", "'tpu'"]),
    "ratio that h does not divide": (lambda c: c["experiments"]["table2"].update(ratios=[0, 0.3]),
                                     ["experiments.table2.ratios[1]", "0.3", "valid ratios: 0, 0.2, 0.4, 0.6, 0.8, 1"]),
    "figure ratio invalid for its experiment": (lambda c: c["figure2"].update(ratio=0.6),
                                                ["figure2", "ratio 0.6", "table1"]),
    "unknown architecture": (lambda c: c["experiments"]["table1"].update(students=["resnet-18"]),
                             ["experiments.table1.students[0]", "resnet-18"]),
    "missing key": (lambda c: c.pop("lam"), ["'lam' is a required property"]),
    "table_h ratio invalid for its experiment": (lambda c: c["table_h"].update(ratios=[0.3]),
                                                 ["table_h.ratios", "ratio 0.3", "table2"]),
    "table_h row without a head over C": (lambda c: c["table_h"].update(methods=["stage1"]),
                                          ["table_h.methods", "stage1", "ncm_acc"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_profile_stops_with_the_key_named(workflow_copy, case):
    edit, must = BAD[case]
    _bad_profile(workflow_copy, edit)
    out = snakemake(["all", "-n", "--config", "profile=bad"], snakefile=workflow_copy / "Snakefile",
                    workdir=workflow_copy, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "config/bad.yaml" in text
    for m in must:
        assert m in text, f"{m!r} not in:\n{text[-3000:]}"
    assert "Job stats" not in text          # nothing was scheduled


def test_unknown_profile_and_unknown_config_key_are_named(workflow_copy):
    out = snakemake(["all", "-n", "--config", "profile=nope"], snakefile=workflow_copy / "Snakefile",
                    workdir=workflow_copy, check=False)
    assert out.returncode != 0 and "unknown profile 'nope'" in out.stdout + out.stderr
    assert "claims, demo, gpu, paper, smoke" in out.stdout + out.stderr
    out = snakemake(["all", "-n", "--config", "profile=smoke", "epochs=3"], snakefile=workflow_copy / "Snakefile",
                    workdir=workflow_copy, check=False)
    assert out.returncode != 0 and "unknown key(s) 'epochs'" in out.stdout + out.stderr
    out = snakemake(["all", "-n", "--config", "profile=smoke", "forkserver=maybe"],
                    snakefile=workflow_copy / "Snakefile", workdir=workflow_copy, check=False)
    assert out.returncode != 0 and "forkserver must be on or off, got 'maybe'" in out.stdout + out.stderr


def test_shipped_profiles_are_valid_and_differ_in_numbers_only():
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.experiments.profile import load_profile

    shapes = {}
    for name in ("smoke", "demo", "gpu", "paper", "claims"):
        cfg = load_profile(ROOT, name)
        # the gain-vs-data points (experiments gain_n<N>) are named after the profile's numbers
        cfg["experiments"] = {k: v for k, v in cfg["experiments"].items() if "teacher_of" not in v}

        def shape(x):
            if isinstance(x, dict):
                return {k: shape(v) for k, v in x.items()}
            return "value"
        shapes[name] = shape(cfg)
    assert all(s == shapes["paper"] for s in shapes.values())   # same keys everywhere
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == {"profile": "demo"}


# ------------------------------------------------------------------------------------------------
# `refilled table`: numbers only from summaries; a gap or a duplicate is an error
# ------------------------------------------------------------------------------------------------


def _fake_summary(path: Path, method: str, arch: str, seed: int, acc: float, ratio=0.5, k_hat=None, task="student"):
    s = {"method": method, "task": task, "arch": arch, "seed": seed, "split": {"ratio": ratio},
         "params": {"lam": 2.0, "k_hat": k_hat}, "test_acc" if method != "stage1" else "ncm_acc": acc}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s))
    return path


def _refused(capsys, argv: list, *parts: str) -> str:
    """`refilled table ...` exits 2 with one error line holding every part; returns that line."""
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refilled table: error: "), err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def test_table_command_means_stds_and_refuses_gaps_and_duplicates(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.cli import main

    paths = [_fake_summary(tmp_path / f"{m}-{a}-{s}.json", m, a, s, 0.5 + 0.01 * i + 0.1 * s)
             for i, m in enumerate(METHODS) for a in ("wrn-16-1", "wrn-10-1") for s in (0, 1)]
    args = ["table", "--table", "2", "--ratios", "0.5", "--columns", "wrn-16-1", "wrn-10-1", "--lam", "2",
            "--out", tmp_path / "t.csv", "--long", tmp_path / "l.csv", "--markdown", tmp_path / "t.md", "--summaries"]
    assert main([str(a) for a in args + paths]) == 0
    wide = _read(tmp_path / "t.csv")
    assert [r["method"] for r in wide] == [LABELS[m] for m in METHODS]
    # seeds 0 and 1 differ by 10 points: mean = 50 + i + 5, sample std = 7.07
    assert wide[2]["wrn-10-1"] == "57.00 ± 7.07"
    assert len(_read(tmp_path / "l.csv")) == 24
    last = (METHODS[-1], "wrn-10-1")                             # the cell of paths[-2:] (seeds 0 and 1)
    _refused(capsys, args + paths[:-1],                          # a seed missing in one cell
             "table 2: every cell needs the same seeds [0, 1]; 1 cell(s) lack some",
             f"(('0.5', '{last[0]}', '{last[1]}'), [1])")
    _refused(capsys, args + paths[:-2],                          # a cell with no run
             "table 2: no runs for 1 cell(s)", f"('0.5', '{last[0]}', '{last[1]}')")
    dup = _fake_summary(tmp_path / "dup.json", METHODS[0], "wrn-16-1", 0, 0.9)
    _refused(capsys, args + paths + [dup],                       # two runs for one cell and seed
             f"{dup}: a second run for ('0.5', '{METHODS[0]}', 'wrn-16-1') seed 0")
    t4 = [_fake_summary(tmp_path / f"k{k}-{r}.json", "stage1", "mobilenet-1.0", 0, 0.3 + 0.01 * i, ratio=r,
                        k_hat=k) for i, (r, k) in enumerate((r, k) for r in (0, 0.5) for k in (1, 5, None))]
    args4 = ["table", "--table", "4", "--ratios", "0", "0.5", "--columns", "1", "5", "inf",
             "--out", tmp_path / "t4.csv", "--long", tmp_path / "l4.csv", "--markdown", tmp_path / "t4.md", "--summaries"]
    assert main([str(a) for a in args4 + t4]) == 0
    assert _read(tmp_path / "t4.csv")[1] == {"ratio": "0.5", "k_hat=1": "33.00 ± n/a", "k_hat=5": "34.00 ± n/a",
                                             "k_hat=inf": "35.00 ± n/a"}


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_metrics_command_means_every_cell_and_refuses_a_bad_value(tmp_path, capsys):
    """`refilled metrics`: per table, experiment, ratio, student and method the mean over seeds
    (computed here by hand) and the seed count; Table H's three accuracies; the AUC; the claims."""
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.cli import main

    run = lambda e, r, a, s, m: f"results/runs/p/students/{e}/r{r}/{a}/seed{s}/{m}/summary.json"
    t1 = _write_rows(tmp_path / "t1.csv", [
        {"ratio": r, "method": m, "arch": a, "seed": s, "test_acc": acc, "val_epoch": "", "test_acc_at_val_epoch": "",
         "summary": run("table1", r, a, s, m)}
        for r, m, a, s, acc in [("0", "student", "w1", 0, 40.0), ("0", "student", "w1", 1, 50.0),
                                ("0", "refilled", "w1", 0, 61.0), ("0", "refilled", "w1", 1, 64.0),
                                ("0.5", "student", "w2", 0, 70.5), ("0.5", "student", "w2", 1, 71.5)]])
    t4 = _write_rows(tmp_path / "t4.csv", [
        {"ratio": "0.5", "k_hat": k, "arch": "m1", "seed": s, "ncm_acc": acc, "val_epoch": "",
         "ncm_acc_at_val_epoch": "", "summary": run("table2", "0.5", "m1", s, f"stage1_k{k}")}
        for k, s, acc in [("1", 0, 30.0), ("1", 1, 34.0), ("inf", 0, 20.0), ("inf", 1, 21.0)]])
    th = _write_rows(tmp_path / "th.csv", [
        {"experiment": "table2", "ratio": "1", "method": "student", "arch": "w1", "seed": s, "acc_old": "",
         "acc_new": new, "H": new, "test_per_class": 4, "test_seed": s, "summary": "x"}
        for s, new in [(0, 10.0), (1, 30.0)]])
    auc = _write_rows(tmp_path / "auc.csv", [{"run": "x", "ratio": "0.6", "arch": "w1", "seed": s, "auc": a}
                                             for s, a in [(0, 0.8), (1, 0.9)]])
    claims = _write_rows(tmp_path / "claims.csv", [{"claim": "a", "comparison": "refilled - student", "scope": "",
                                                    "n_seeds": 2, "mean": 12.5, "ci_low": "", "ci_high": "",
                                                    "rule": "", "verdict": "inconclusive", "paper": ""}])
    out = tmp_path / "metrics.json"
    args = ["metrics", "--profile", "p", "--table", "1", t1, "--table", "4", t4, "--table", "h", th,
            "--lambda-auc", auc, "--claims", claims, "--out", out]
    assert main([str(a) for a in args]) == 0
    m = json.loads(out.read_text())
    assert m["profile"] == "p"
    assert m["table1"]["table1"]["r0"]["w1"] == {"student": {"mean": 45.0, "n_seeds": 2},
                                                 "refilled": {"mean": 62.5, "n_seeds": 2}}
    assert m["table1"]["table1"]["r0.5"]["w2"]["student"] == {"mean": 71.0, "n_seeds": 2}
    assert m["table4"]["table2"]["r0.5"]["m1"] == {"k_hat=1": {"mean": 32.0, "n_seeds": 2},
                                                  "k_hat=inf": {"mean": 20.5, "n_seeds": 2}}
    assert m["table_h"]["table2"]["r1"]["w1"]["student"] == {"acc_old": {"mean": None, "n_seeds": 2},
                                                             "acc_new": {"mean": 20.0, "n_seeds": 2},
                                                             "H": {"mean": 20.0, "n_seeds": 2}}
    assert m["lambda_auc"] == {"r0.6": {"w1": {"auc": {"mean": 0.85, "n_seeds": 2}}}}
    assert m["claims"] == {"a": {"refilled - student": {"verdict": "inconclusive", "mean": 12.5, "n_seeds": 2}}}
    # a value that is not a number: exit 2, the file and the column named, nothing (re)written
    out.unlink()
    bad = _write_rows(tmp_path / "bad.csv", [{**_read(t1)[0], "test_acc": "n/a"}])
    capsys.readouterr()
    assert main([str(a) for a in ["metrics", "--profile", "p", "--table", "1", bad, "--out", out]]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: test_acc = 'n/a' is not a number" in err and not out.exists(), err
    assert main([str(a) for a in ["metrics", "--profile", "p", "--table", "2", t4, "--out", out]]) == 2
    assert f"{t4}: no column 'method', 'test_acc'" in capsys.readouterr().err and not out.exists()


def test_plot_data_averages_figure1_per_epoch_and_figure2_per_student_and_lambda(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.cli import main

    def metrics_csv(d: Path, rows: list[dict]) -> Path:
        _write_rows(d / "metrics.csv", rows)
        return d

    s1 = [metrics_csv(tmp_path / f"s1_{s}", [{"epoch": e, "cm": 0.1 * e + s, "ncm_acc": 0.5 + 0.1 * s}
                                            for e in (1, 2)]) for s in (0, 1)]
    s2 = [metrics_csv(tmp_path / f"s2_{s}", [{"epoch": 1, "ce": 2.0 + s, "teach": 0.5, "test_acc": ""},   # not evaluated
                                            {"epoch": 2, "ce": 1.0 + s, "teach": 0.25, "test_acc": 0.6 + 0.2 * s}])
          for s in (0, 1)]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    runs = [s1[0], s2[0], s1[1], s2[1]]
    assert main([str(x) for x in ["plot-data", "--figure", "1", "--runs", *runs, "--out", a, b]]) == 0
    rows = _read(a)
    assert [(int(r["epoch"]), float(r["cm"]), float(r["ncm_acc"])) for r in rows] == \
        [(1, pytest.approx(0.6), pytest.approx(55.0)), (2, pytest.approx(0.7), pytest.approx(55.0))]
    rows = _read(b)                                            # epoch 1 has no test accuracy: left out
    assert [(int(r["epoch"]), float(r["ce"]), float(r["teach"]), float(r["test_acc"])) for r in rows] == \
        [(2, pytest.approx(1.5), pytest.approx(0.25), pytest.approx(70.0))]
    sweep = []
    for arch, lam, s, acc in [("w1", 1, 0, 0.5), ("w1", 1, 1, 0.7), ("w1", 4, 0, 0.8), ("w2", 1, 0, 0.3)]:
        d = tmp_path / f"{arch}_{lam}_{s}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"arch": arch, "params": {"lam": lam}, "test_acc": acc}))
        sweep.append(d)
    out = tmp_path / "sweep.csv"
    assert main([str(x) for x in ["plot-data", "--figure", "2", "--runs", *sweep, "--out", out]]) == 0
    assert [(r["student"], float(r["lam"]), float(r["test_acc"]), int(r["n_seeds"])) for r in _read(out)] == \
        [("w1", 1.0, pytest.approx(60.0), 2), ("w1", 4.0, pytest.approx(80.0), 1), ("w2", 1.0, pytest.approx(30.0), 1)]
    # an odd number of Figure 1 runs: exit 2, nothing written
    a.unlink()
    capsys.readouterr()
    assert main([str(x) for x in ["plot-data", "--figure", "1", "--runs", *runs[:3], "--out", a, b]]) == 2
    assert "figure 1 needs pairs of run directories (stage 1, stage 2), got 3" in capsys.readouterr().err
    assert not a.exists()


def _stage1_summary(path: Path, ratio: float, k_hat, seed: int, ncm_acc: float, arch="mobilenet-1.0") -> Path:
    """A stage-1 run's summary as Table 4 reads it."""
    s = {"kind": "stage1", "method": "stage1", "task": "student", "arch": arch, "seed": seed,
         "split": {"ratio": ratio}, "params": {"lam": 2.0, "k_hat": k_hat}, "ncm_acc": ncm_acc}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s))
    return path


def test_table_refuses_a_lambda_mismatch_a_run_outside_the_grid_and_a_non_stage1_run_in_table4(tmp_path, capsys):
    paths = [_fake_summary(tmp_path / f"{m}-{s}.json", m, "wrn-16-1", s, 0.5 + 0.01 * i)
             for i, m in enumerate(METHODS) for s in (0, 1)]
    args = ["table", "--table", "2", "--ratios", "0.5", "--columns", "wrn-16-1", "--lam", "2",
            "--out", tmp_path / "t.csv", "--long", tmp_path / "l.csv", "--markdown", tmp_path / "t.md", "--summaries"]
    # a REFILLED run trained with another lambda than the table's
    other_lam = tmp_path / "refilled-1.json"
    s = json.loads(other_lam.read_text())
    s["params"]["lam"] = 1.0
    other_lam.write_text(json.dumps(s))
    _refused(capsys, args + paths, f"{other_lam}: lambda 1.0 but the table's REFILLED rows use lambda 2.0")
    s["params"]["lam"] = 2.0
    other_lam.write_text(json.dumps(s))
    # a run at a ratio, and one of an architecture, that the table does not have
    for name, ratio, arch, key in (("r25", 0.25, "wrn-16-1", "ratio 0.25, refilled, wrn-16-1"),
                                   ("w40", 0.5, "wrn-40-2", "ratio 0.5, refilled, wrn-40-2")):
        outside = _fake_summary(tmp_path / f"{name}.json", "refilled", arch, 0, 0.7, ratio=ratio)
        _refused(capsys, args + paths + [outside], f"{outside}: run ({key}) is not in the table's grid")
    # Table 4 takes stage-1 runs only
    t4 = [_stage1_summary(tmp_path / f"k{k}.json", 0.5, k, 0, 0.3) for k in (1, 5, None)]
    args4 = ["table", "--table", "4", "--ratios", "0.5", "--columns", "1", "5", "inf",
             "--out", tmp_path / "t4.csv", "--long", tmp_path / "l4.csv", "--markdown", tmp_path / "t4.md", "--summaries"]
    stage2 = _fake_summary(tmp_path / "s2.json", "refilled", "mobilenet-1.0", 1, 0.6, k_hat=None)
    _refused(capsys, args4 + t4 + [stage2], f"{stage2}: Table 4 needs stage-1")
    assert not (tmp_path / "t4.csv").exists() and not (tmp_path / "t.csv").exists()


def test_table4_with_seeds_has_a_real_std_and_the_paper_labels(tmp_path):
    """Three seeds per cell, NCM accuracy seed 0/1/2 = v - 2, v, v + 2 (%): mean v, sample
    std sqrt((4 + 0 + 4) / 2) = 2."""
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.cli import main

    ratios, k_hats = (0.0, 0.5), (1, 5, None)
    base = {(r, k): 30.0 + 10 * i + 3 * j for i, r in enumerate(ratios) for j, k in enumerate(k_hats)}
    t4 = [_stage1_summary(tmp_path / f"k{k}-r{r}-s{seed}.json", r, k, seed, (base[(r, k)] + 2 * (seed - 1)) / 100)
          for r in ratios for k in k_hats for seed in (0, 1, 2)]
    args4 = ["table", "--table", "4", "--ratios", "0", "0.5", "--columns", "1", "5", "inf",
             "--out", tmp_path / "t4.csv", "--long", tmp_path / "l4.csv", "--markdown", tmp_path / "t4.md", "--summaries"]
    assert main([str(a) for a in args4 + t4]) == 0
    wide = _read(tmp_path / "t4.csv")
    assert wide == [{"ratio": "0", "k_hat=1": "30.00 ± 2.00", "k_hat=5": "33.00 ± 2.00", "k_hat=inf": "36.00 ± 2.00"},
                    {"ratio": "0.5", "k_hat=1": "40.00 ± 2.00", "k_hat=5": "43.00 ± 2.00", "k_hat=inf": "46.00 ± 2.00"}]
    assert len(_read(tmp_path / "l4.csv")) == 18
    md = (tmp_path / "t4.md").read_text().splitlines()
    assert "| K̂ | 1 (triplet) | 5 | inf (tuple) |" in md
    assert "| overlap ratio = 0% | 30.00 ± 2.00 | 33.00 ± 2.00 | 36.00 ± 2.00 |" in md
    assert "| overlap ratio = 50% | 40.00 ± 2.00 | 43.00 ± 2.00 | 46.00 ± 2.00 |" in md
    assert any(line.startswith("**Table 4.**") and "mobilenet-1.0" in line for line in md)


# ------------------------------------------------------------------------------------------------
# GPU slots (refilled pin itself: tests/test_pin.py)
# ------------------------------------------------------------------------------------------------


def _provided_resources(tmp: Path, gpus: str | None, extra: list = ()) -> str:
    env = _env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus        # what the Snakefile counts (no GPU needs to exist)
    shutil.rmtree(tmp / "data", ignore_errors=True)
    proc = subprocess.run([str(BIN / "snakemake"), "data/splits/fashion-mnist/seeded/h5/r0/seed0.json", "-s",
                           str(ROOT / "Snakefile"), "-d", str(tmp), "--cores", "2", *extra,
                           "--config", "profile=smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "\n".join(l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("Provided resources"))


def test_gpu_slots_limit_the_gpu_jobs_snakemake_runs_at_once(tmp_path):
    slots = profile("smoke")["gpu_slots_per_gpu"]
    assert f'gpu", {2 * slots})' in _provided_resources(tmp_path, "0,1")      # 2 GPUs x slots per GPU
    assert f'gpu", {1 * slots})' in _provided_resources(tmp_path, "0")
    assert 'gpu", 1)' in _provided_resources(tmp_path, "0,1", ["--resources", "gpu=1"])   # the command line wins
    assert "gpu" not in _provided_resources(tmp_path, "")                      # no GPU: no limit, all on the CPU


# ------------------------------------------------------------------------------------------------
# DVC and Snakemake agree
# ------------------------------------------------------------------------------------------------


def _dag_outputs(prof: str, workdir: Path) -> set[str]:
    out = snakemake(["all", "data", "teachers", "students", "tables", "figures", "metrics", "--summary",
                     "--config", f"profile={prof}"], workdir=workdir)
    files = set()
    for line in out.stdout.splitlines()[1:]:
        first = line.split("\t")[0].strip()
        if first and not first.startswith(("Building", "Assuming")):
            files.add(first)
    return files


def _dvc_outs(prof: str) -> list[str]:
    """Every stage's outs and metrics (DVC caches both)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for o in stage["outs"] + stage.get("metrics", []):
            path = next(iter(o)) if isinstance(o, dict) else o
            outs.append(path.replace("${profile}", prof))
    return outs


@pytest.mark.parametrize("prof", ["smoke", "paper"])
def test_dvc_outputs_are_exactly_what_the_snakemake_dag_makes(tmp_path, prof):
    dag = _dag_outputs(prof, tmp_path)
    assert any(f.startswith(f"results/runs/{prof}/students/") for f in dag)
    outs = _dvc_outs(prof)
    for o in outs:          # every DVC output is made by the DAG (a file, or files under a directory)
        assert o in dag or any(f.startswith(o + "/") for f in dag), f"dvc.yaml declares {o}, the DAG never makes it"
    for f in dag:           # and the DAG makes nothing DVC does not track (logs and benchmarks aside)
        if f.startswith(("results/logs/", "results/benchmarks/")):
            continue
        assert any(f == o or f.startswith(o + "/") for o in outs), f"{f} is made by Snakemake but not a DVC output"
    # each DVC stage calls one Snakemake target rule
    snakefile = (ROOT / "Snakefile").read_text()
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        target = stage["cmd"].split()[-1]
        assert stage["cmd"].startswith("snakemake ") and re.search(rf"^rule {target}:", snakefile, re.M), name
        assert all(o.get(next(iter(o)), {}).get("persist") for o in stage["outs"] + stage.get("metrics", [])), name


# ------------------------------------------------------------------------------------------------
# End to end on the smoke profile, in a temporary clone
# ------------------------------------------------------------------------------------------------


def _working_tree_files() -> list[str]:
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _checksums(root: Path, paths: list[str]) -> dict[str, str]:
    sums = {}
    for p in paths:
        base = root / p
        files = [base] if base.is_file() else sorted(x for x in base.rglob("*") if x.is_file())
        for f in files:
            sums[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return sums


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def smoke_clone(tmp_path_factory):
    """A copy of the working tree (what a clone has), the raw data, git + DVC, profile smoke; run once."""
    base = tmp_path_factory.mktemp("clone")
    repo = base / "repo"
    for f in _working_tree_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    # Like a fresh clone, no data/raw: the workflow obtains Fashion-MNIST from Debian's files
    # (make test installs them as root). Elsewhere the checkout's copy is put in first.
    fetched_by_workflow = DEBIAN_FASHION_MNIST.is_dir()
    if not fetched_by_workflow:
        raw = ROOT / "data" / "raw" / "fashion-mnist"
        assert raw.is_dir(), f"Fashion-MNIST must be in data/raw (make data) or in {DEBIAN_FASHION_MNIST}"
        shutil.copytree(raw, repo / "data" / "raw" / "fashion-mnist")
    (repo / "params.yaml").write_text("profile: smoke\n")
    run(["git", "init", "-q"], cwd=repo)
    began = time.time()
    snakemake(["all", "--cores", "2"], snakefile=repo / "Snakefile", workdir=repo, timeout=1200)
    return {"repo": repo, "remote": base / "dvc-remote", "seconds": time.time() - began,
            "fetched_by_workflow": fetched_by_workflow}


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_every_table_and_figure_exists(smoke_clone):
    repo = smoke_clone["repo"]
    for f in TABLE_FILES + FIGURE_FILES + ["results/lambda_auc.csv"]:
        assert (repo / f).is_file() and (repo / f).stat().st_size > 0, f
    for f in FIGURE_FILES:
        head = (repo / f).read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if f.endswith(".png") else head.startswith(b"%PDF")
        assert (repo / f).stat().st_size > 10_000, f   # axes, labels and legends, not an empty canvas


@pytest.mark.slow
def test_smoke_training_jobs_ran_in_the_fork_server_which_then_stopped(smoke_clone):
    """A local run's training jobs go through refilled.tools.forkserver (none refused), and the
    server ends with Snakemake, leaving no socket."""
    repo = smoke_clone["repo"]
    log = (repo / ".snakemake" / "refilled-forkserver.log").read_text()
    started = re.findall(r"^job (\d+): refilled pin ", log, re.M)
    exits = dict(re.findall(r"^job (\d+): exit (-?\d+)$", log, re.M))
    runs = [p for p in (repo / "results" / "runs" / "smoke").rglob("summary.json")
            if ".finished" not in p.parts and "fingerprint" in json.loads(p.read_text())]
    # the first jobs may start before the server listens (a few seconds); they run as before
    assert 0.8 * len(runs) <= len(started) <= len(runs), (len(started), len(runs))
    assert all(exits.get(pid) == "0" for pid in started), log[-3000:]
    refused = [p for p in (repo / "results" / "logs").rglob("*.log") if "did not take this job" in p.read_text()]
    assert not refused, refused[:3]
    assert not (repo / ".snakemake" / "refilled-forkserver.sock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("table,exp", [("1", "table1"), ("2", "table2")])
def test_smoke_tables_1_2_shape_and_every_cell_traces_to_summaries(smoke_clone, table, exp):
    repo = smoke_clone["repo"]
    cfg = profile("smoke")
    e = cfg["experiments"][exp]
    wide = _read(repo / f"results/table{table}.csv")
    assert list(wide[0]) == ["ratio", "method", *e["students"]]
    assert [(r["ratio"], r["method"]) for r in wide] == [(g(r), LABELS[m]) for r in e["ratios"] for m in METHODS]
    long = _read(repo / f"results/table{table}_long.csv")
    assert len(long) == len(e["ratios"]) * len(METHODS) * len(e["students"]) * len(cfg["seeds"])
    for row in long:                         # each long row is its summary.json
        s = json.loads((repo / row["summary"]).read_text())
        assert row["summary"].startswith(f"results/runs/smoke/students/{exp}/r{row['ratio']}/{row['arch']}/seed")
        assert (s["arch"], s["method"], s["seed"], g(s["split"]["ratio"])) == \
            (row["arch"], row["method"], int(row["seed"]), row["ratio"])
        assert float(row["test_acc"]) == pytest.approx(100 * s["test_acc"])
        if s["method"] in ("refilled", "refilled-minus"):
            assert s["params"]["lam"] == cfg["lam"]
    for w in wide:                           # each wide cell is the mean of its runs' summaries
        method = next(m for m in METHODS if LABELS[m] == w["method"])
        for arch in e["students"]:
            paths = [r["summary"] for r in long if (r["ratio"], r["method"], r["arch"]) == (w["ratio"], method, arch)]
            assert len(paths) == len(cfg["seeds"])
            values = [100 * json.loads((repo / p).read_text())["test_acc"] for p in paths]
            mean, _, std = w[arch].partition(" ± ")
            assert float(mean) == pytest.approx(statistics.fmean(values), abs=0.005)
            assert std == ("n/a" if len(values) == 1 else f"{statistics.stdev(values):.2f}")
    md = (repo / f"results/table{table}.md").read_text()
    assert md.count("**Overlap ratio") == len(e["ratios"]) and all(a in md for a in e["students"])


@pytest.mark.slow
def test_smoke_table3_shape_and_every_cell_traces_to_summaries(smoke_clone):
    """Standard KD: the profile's methods as rows, its students as columns, one ratio (1);
    every cell the mean of its runs' summary.json, the caption the teachers' accuracy."""
    repo = smoke_clone["repo"]
    cfg = profile("smoke")
    e = cfg["experiments"]["table3"]
    wide = _read(repo / "results/table3.csv")
    assert list(wide[0]) == ["ratio", "method", *e["students"]]
    assert [r["method"] for r in wide] == [CATALOG[m].label for m in e["methods"]]
    long = _read(repo / "results/table3_long.csv")
    assert len(long) == len(e["methods"]) * len(e["students"]) * len(cfg["seeds"])
    for row in long:
        s = json.loads((repo / row["summary"]).read_text())
        assert row["summary"].startswith(f"results/runs/smoke/students/table3/r1/{row['arch']}/seed")
        assert (s["arch"], s["method"], s["seed"]) == (row["arch"], row["method"], int(row["seed"]))
        assert s["split"]["teacher_classes"] == s["split"]["student_classes"] and len(s["split"]["student_classes"]) == 10
        assert float(row["test_acc"]) == pytest.approx(100 * s["test_acc"])
    for w in wide:
        method = e["methods"][[CATALOG[m].label for m in e["methods"]].index(w["method"])]
        for arch in e["students"]:
            values = [100 * json.loads((repo / r["summary"]).read_text())["test_acc"] for r in long
                      if (r["method"], r["arch"]) == (method, arch)]
            assert len(values) == len(cfg["seeds"])
            assert float(w[arch].partition(" ± ")[0]) == pytest.approx(statistics.fmean(values), abs=0.005)
    teachers = [json.loads((repo / f"results/runs/smoke/teachers/table3/seed{s}/summary.json").read_text())
                for s in cfg["seeds"]]
    md = (repo / "results/table3.md").read_text()
    acc = statistics.fmean(100 * t["test_acc"] for t in teachers)
    assert f"Teacher {e['teacher']['arch']}: {acc:.2f} ± " in md


@pytest.mark.slow
def test_smoke_table4_shape_and_cells_trace_to_stage1_summaries(smoke_clone):
    repo = smoke_clone["repo"]
    t4 = profile("smoke")["table4"]
    wide = _read(repo / "results/table4.csv")
    assert list(wide[0]) == ["ratio"] + [f"k_hat={k}" for k in t4["k_hats"]]
    assert [r["ratio"] for r in wide] == [g(r) for r in t4["ratios"]]
    long = _read(repo / "results/table4_long.csv")
    assert len(long) == len(t4["ratios"]) * len(t4["k_hats"])
    for row in long:
        s = json.loads((repo / row["summary"]).read_text())
        assert s["method"] == "stage1" and s["arch"] == t4["arch"]
        assert str(s["params"]["k_hat"] or "inf") == row["k_hat"]
        cell = next(w for w in wide if w["ratio"] == row["ratio"])[f"k_hat={row['k_hat']}"]
        assert float(cell.split(" ± ")[0]) == pytest.approx(100 * s["ncm_acc"], abs=0.005)


@pytest.mark.slow
def test_smoke_table_h_shape_and_every_cell_traces_to_summaries(smoke_clone):
    repo = smoke_clone["repo"]
    cfg = profile("smoke")
    th = cfg["table_h"]
    (exp,) = th["experiments"]
    ratios, archs = th["ratios"] or cfg["experiments"][exp]["ratios"], th["students"]
    assert 1 in ratios                        # the smoke grid covers r = 1 (no old classes)
    rows = [*th["methods"], "reference"]
    long = _read(repo / "results/table_h_long.csv")
    assert [(r["ratio"], r["method"], r["arch"]) for r in long] == \
        [(g(r), m, a) for r in ratios for m in rows for a in archs for _ in cfg["seeds"]]
    for row in long:                          # each long row is its summary.json: a joint-head run or a reference
        s = json.loads((repo / row["summary"]).read_text())
        run = row["summary"].split("/")[-2]
        assert row["summary"].startswith(f"results/runs/smoke/students/{exp}/r{row['ratio']}/{row['arch']}/seed")
        if row["method"] == "reference":
            assert run == "reference" and s["method"] == "reference"
            assert s["params"]["student"].endswith(f"/seed{row['seed']}/student/model.pt")   # the plain run
        else:
            assert run.startswith(row["method"]) and run.endswith("-joint") and s["method"] == row["method"]
            assert s["fingerprint"]["optim"]["extra"]["joint"] == \
                {"weight": th["weight"], "T": th["T"], "test_per_class": th["test_per_class"]}
        j = s["joint"]
        assert j["test"]["seed"] == s["seed"] and len(set(j["test"]["counts"].values())) == 1   # balanced
        a, n = j["acc_old"], j["acc_new"]
        h = n if a is None else (0.0 if a + n == 0 else 2 * a * n / (a + n))
        assert float(row["H"]) == pytest.approx(100 * h) and float(row["acc_new"]) == pytest.approx(100 * n)
        if row["ratio"] == "1":               # no old classes: no Acc_C', H = Acc_C
            assert a is None and row["acc_old"] == "" and j["old_classes"] == []
        else:
            assert float(row["acc_old"]) == pytest.approx(100 * a)
    wide = _read(repo / "results/table_h.csv")
    assert list(wide[0]) == ["experiment", "ratio", "method", *archs]
    assert [(w["ratio"], w["method"]) for w in wide] == \
        [(g(r), "Reference (teacher ⊕ student heads, no training)" if m == "reference"
          else f"{CATALOG[m].label} + joint head") for r in ratios for m in rows]
    for w, (r, m) in zip(wide, [(r, m) for r in ratios for m in rows]):
        for arch in archs:
            recs = [x for x in long if (x["ratio"], x["method"], x["arch"]) == (g(r), m, arch)]
            assert len(recs) == len(cfg["seeds"])
            for text, key in zip(w[arch].split(" / "), ("acc_old", "acc_new", "H")):
                if key == "acc_old" and r == 1:
                    assert text == "—"
                    continue
                mean = statistics.fmean(100 * json.loads((repo / x["summary"]).read_text())["joint"][key] for x in recs)
                assert float(text.split(" ± ")[0]) == pytest.approx(mean, abs=0.005)
    md = (repo / "results/table_h.md").read_text()
    assert md.count("overlap ratio =") == len(ratios) and "H is the plain accuracy" in md


@pytest.mark.slow
def test_smoke_lambda_auc_and_figure_inputs(smoke_clone):
    repo = smoke_clone["repo"]
    f3 = profile("smoke")["figure3"]
    rows = _read(repo / "results/lambda_auc.csv")
    assert [r["ratio"] for r in rows] == [g(r) for r in f3["ratios"]]
    for r in rows:
        lam = _read(repo / r["run"] / "lambda_i.csv")
        seen = [int(x["seen"]) for x in lam]
        assert int(r["n_seen"]) == sum(seen) and int(r["n_unseen"]) == len(seen) - sum(seen)
        assert float(r["lam"]) == f3["lam"]
        assert all(0 < float(x["lambda_i"]) <= f3["lam"] for x in lam)
        if r["ratio"] == "1":
            assert r["auc"] == "" and int(r["n_unseen"]) == 0      # every class is seen: AUC undefined
        else:
            from sklearn.metrics import roc_auc_score
            assert float(r["auc"]) == pytest.approx(roc_auc_score(seen, [float(x["lambda_i"]) for x in lam]), abs=1e-6)


@pytest.mark.slow
def test_smoke_reproduction_report_orders_our_table_means(smoke_clone):
    """Fashion-MNIST is not the paper's dataset: the report compares orderings, each of our
    students beside the paper's that stands so to its teacher (none for smoke's WRN-(10,2) under
    a (10,1) teacher), and each block's order is that of our long CSV's means (one seed: the
    values themselves)."""
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.report.reproduction import paper_counterpart

    repo = smoke_clone["repo"]
    cfg = profile("smoke")
    rows = _read(repo / "results/reproduction.csv")
    assert rows and {r["comparison"] for r in rows} == {"ordering"}
    for t in ("1", "2"):
        teacher = cfg["experiments"][f"table{t}"]["teacher"]["arch"]
        acc = {(r["ratio"], r["arch"], r["method"]): float(r["test_acc"]) for r in _read(repo / f"results/table{t}_long.csv")}
        blocks = [r for r in rows if r["table"] == t]
        want = {(k[0], k[1], paper_counterpart(t, k[1], teacher)) for k in acc}
        assert {(b["ratio"], b["student"], b["paper_student"]) for b in blocks} == {w for w in want if w[2]}
        for b in blocks:
            order = b["ours_order"].split(" > ")
            values = [acc[(b["ratio"], b["student"], m)] for m in order]
            assert values == sorted(values, reverse=True) and len(order) == int(b["methods"])
    assert "Kendall" in (repo / "results/reproduction.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_smoke_claims_target_traces_every_comparison_to_the_tables(smoke_clone):
    """`snakemake claims`: each claim-(a) comparison is the per-seed difference of two rows of
    Table 2's long CSV (themselves traced to summaries); the gain-vs-data rows are the sweep's
    own runs (experiments gain_n<N>, one per images-per-class point, sharing Table 2's teacher),
    or Table 2's own runs at its per_class (smoke: 8), not trained twice; the report shows the claims in their own category."""
    repo = smoke_clone["repo"]
    cfg = profile("smoke")
    snakemake(["claims", "--cores", "2"], snakefile=repo / "Snakefile", workdir=repo, timeout=900)
    long = _read(repo / "results/table2_long.csv")
    acc = {(r["ratio"], r["method"], r["arch"], r["seed"]): float(r["test_acc"]) for r in long}
    rows = _read(repo / "results/claims.csv")
    a_rows = [r for r in rows if r["claim"] == "a"]
    assert len(a_rows) == len(cfg["experiments"]["table2"]["ratios"]) * 5
    for r in a_rows:
        ratio = r["scope"].split("r=")[1]
        baseline = r["comparison"].split(" - ")[1]
        archs = cfg["experiments"]["table2"]["students"]
        want = statistics.fmean(acc[(ratio, "refilled", a, "0")] - acc[(ratio, baseline, a, "0")] for a in archs)
        assert float(r["mean"]) == pytest.approx(want, abs=1e-3)
        assert r["verdict"] == "inconclusive" and r["ci_low"] == ""       # one seed: no interval
    assert {r["claim"] for r in rows} == set("abcde")
    sys.path.insert(0, str(ROOT / "src"))
    from refilled.experiments.profile import gain_points

    sweep = cfg["gain_vs_data"]
    points = gain_points(cfg)
    assert points[cfg["experiments"]["table2"]["per_class"]] == "table2"
    gain = _read(repo / "results/gain_vs_data.csv")
    for row in gain:
        if row["quantity"] == "refilled - student":
            run = f"results/runs/smoke/students/{points[int(row['per_class'])]}/r{row['ratio']}/{sweep['arch']}/seed0"
            dirs = {"student": "student", "refilled": f"refilled_lam{g(cfg['lam'])}"}   # REFILLED's path spells lambda
            s = {m: json.loads((repo / run / d / "summary.json").read_text()) for m, d in dirs.items()}
            assert s["student"]["data"]["per_class"] == int(row["per_class"])
            assert float(row["mean"]) == pytest.approx(100 * (s["refilled"]["test_acc"] - s["student"]["test_acc"]),
                                                       abs=1e-3)
            assert s["refilled"]["params"]["teacher"].endswith("teachers/table2/seed0/model.pt")
    assert {int(r["per_class"]) for r in gain} == set(sweep["per_class"])
    assert (repo / "figures/gain_vs_data.png").stat().st_size > 10_000
    snakemake(["claims", "--report", "claims.html"], snakefile=repo / "Snakefile", workdir=repo, timeout=600)
    html = (repo / "claims.html").read_text(errors="replace")
    assert "claims.csv" in html and "gain_vs_data.png" in html and "Claims" in html


@pytest.mark.slow
def test_smoke_report_is_one_page_with_every_table_and_figure(smoke_clone):
    repo = smoke_clone["repo"]
    snakemake(["all", "--report", "report.html"], snakefile=repo / "Snakefile", workdir=repo, timeout=600)
    html = (repo / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for name in ("table1.csv", "table2.csv", "table4.csv", "table_h.csv", "lambda_auc.csv", "figure1_convergence.png",
                 "figure2_lambda_sweep.png", "figure3_lambda_hist.png"):
        assert name in html, name
    assert "Histograms of the adaptive weight" in html and "Quality of the student" in html   # captions


needs_chromium = pytest.mark.skipif(chromium.EXE is None, reason="Debian's chromium is not installed (as root, "
                                                                 "`make test` installs it: make browser)")


# Each result of the report: (its menu category, its subcategory where the category has several,
# its caption file under workflow/report/), as the rules declare them with report().
REPORT_RESULTS = {
    **{f"results/{t}.csv": ("Tables", None, f"{t}.rst")
       for t in ("table1", "table2", "table3", "table4", "table_h", "reproduction")},
    "figures/figure1_convergence.png": ("Figures", "Figure 1", "figure1.rst"),
    "figures/figure2_lambda_sweep.png": ("Figures", "Figure 2", "figure2.rst"),
    "figures/figure3_lambda_hist.png": ("Figures", "Figure 3", "figure3.rst"),
    "results/lambda_auc.csv": ("Figures", "Figure 3", "lambda_auc.rst"),
}

def _click_link(browser, text: str) -> None:
    """Click the one link whose text is `text` (a menu item of the report)."""
    links = f"Array.from(document.querySelectorAll('a')).filter(a => a.textContent.trim() === {json.dumps(text)})"
    assert browser.evaluate(f"{links}.length") == 1, text
    browser.evaluate(f"{links}[0].click()")
    time.sleep(0.3)


@pytest.mark.slow
@needs_chromium
def test_smoke_report_renders_in_a_browser_with_every_table_and_figure_and_caption(smoke_clone, tmp_path):
    """The report is a JavaScript app: in headless Chromium, a reader's clicks (category, then
    subcategory) list each result; its view button shows the figure (a decoded image) or
    downloads the table (a data URI holding the CSV's bytes), its info button shows its caption.
    No JavaScript error on the way."""
    import base64
    import urllib.parse

    repo = smoke_clone["repo"]
    if not (repo / "report.html").is_file():
        snakemake(["all", "--report", "report.html"], snakefile=repo / "Snakefile", workdir=repo, timeout=600)
    url = (repo / "report.html").as_uri()
    with chromium.Browser(tmp_path / "chromium") as browser:
        for path, (category, subcategory, caption_file) in REPORT_RESULTS.items():
            browser.open(url, "document.readyState === 'complete' && document.body.innerText.includes('RESULTS')")
            _click_link(browser, category)
            if subcategory:
                _click_link(browser, subcategory)
            row = f"Array.from(document.querySelectorAll('tr')).find(r => r.cells[0] && " \
                  f"r.cells[0].textContent.trim() === {json.dumps(path)})"
            assert browser.evaluate(f"!!{row}"), f"{path}: not listed under {category} / {subcategory}"
            view, info = f"{row}.querySelectorAll('a')[0]", f"{row}.querySelectorAll('a')[1]"
            if path.endswith(".png"):
                browser.evaluate(f"{view}.click()")
                time.sleep(0.5)
                shown = browser.evaluate("Array.from(document.images).filter(i => i.src.startsWith("
                                         "'data:image/png')).map(i => i.naturalWidth)")
                assert len(shown) == 1 and shown[0] > 100, (path, shown)
            else:
                href = browser.evaluate(f"{view}.href")
                head, data = href.split(",", 1)
                body = base64.b64decode(data) if head.endswith(";base64") else urllib.parse.unquote_to_bytes(data)
                assert head.startswith("data:text/csv") and body == (repo / path).read_bytes(), (path, head)
            browser.evaluate(f"{info}.click()")
            time.sleep(0.5)
            first = (ROOT / "workflow" / "report" / caption_file).read_text().splitlines()[0]
            caption = " ".join(first.replace("**", "").split("``")[0].split())
            text = " ".join(browser.evaluate("document.body.innerText").split())
            assert "DESCRIPTION" in text.upper() and caption in text, (path, caption, text[:2000])
            if path == "figures/figure3_lambda_hist.png":
                browser.screenshot(tmp_path / "report.png")
        errors = browser.errors()
    assert errors == []


# ------------------------------------------------------------------------------------------------
# A finished workflow stays finished: no rerun trigger fires without a real change
# ------------------------------------------------------------------------------------------------


def _planned_jobs(repo: Path, target: str = "all") -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run of `target` plans; [] when nothing is to be done."""
    out = snakemake([target, "-n"], snakefile=repo / "Snakefile", workdir=repo)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return []
    blocks = re.split(r"^(?:local)?rule (\w+):$", text, flags=re.M)
    jobs = [(name, m.group(1) if (m := re.search(r"^    output: ([^,\n]+)", body, flags=re.M)) else "")
            for name, body in zip(blocks[1::2], blocks[2::2])]
    assert jobs and len(jobs) == sum(job_counts(text).values()), text[-3000:]
    return jobs


def _outputs_state(repo: Path) -> dict[str, tuple[int, str]]:
    """mtime and checksum of every file the smoke DAG made."""
    files = [f for d in ("data/prepared/smoke", "data/splits", "results/runs/smoke", "figures")
             for f in (repo / d).rglob("*") if f.is_file() and ".finished" not in f.parts]
    files += [f for f in (repo / "results").glob("*.*") if f.is_file()]
    return {str(f.relative_to(repo)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files}


@pytest.mark.slow
def test_smoke_a_finished_workflow_stays_finished(smoke_clone):
    """After `all` completed in a clone without data/raw (the data rule obtained Fashion-MNIST),
    a dry run plans nothing; a second full invocation runs nothing and rewrites nothing; and a
    dry run after it still plans nothing. Before the fix, the data rule's input set changed once
    the raw files were there, and every run of the profile was planned again."""
    repo = smoke_clone["repo"]
    if smoke_clone["fetched_by_workflow"]:
        assert sorted(p.name for p in (repo / "data/raw/fashion-mnist").iterdir()) == \
            sorted(p.name for p in DEBIAN_FASHION_MNIST.iterdir())
    assert _planned_jobs(repo) == []
    before = _outputs_state(repo)
    assert any(k.endswith("model.pt") for k in before)
    again = snakemake(["all", "--cores", "2"], snakefile=repo / "Snakefile", workdir=repo)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]
    assert _outputs_state(repo) == before                 # not one file rewritten or touched
    assert _planned_jobs(repo) == []


@pytest.mark.slow
def test_smoke_touch_after_a_restore_with_new_mtimes_leaves_nothing_to_do(smoke_clone):
    """What `dvc checkout` does to Snakemake's view: every output comes back with the same bytes
    and a new mtime, here in an order that puts inputs after their outputs. `snakemake --touch`
    (as the docs say) settles whatever the mtime trigger sees, and nothing is retrained:
    Snakemake's own records (.snakemake) are kept, so params, input and code are compared too."""
    repo = smoke_clone["repo"]
    before = _outputs_state(repo)
    restored = sorted(before, reverse=True)        # results/runs before data/: inputs come back newer
    start = time.time() - len(restored) - 60       # all in the past, as a checkout's would be
    for i, path in enumerate(restored):
        os.utime(repo / path, (start + i, start + i))
    # (a dry run here may or may not plan jobs: where Snakemake recorded an input's checksum, an
    # input newer than its output but with the same bytes does not trigger a rerun)
    snakemake(["all", "--touch", "--cores", "1"], snakefile=repo / "Snakefile", workdir=repo)
    assert _planned_jobs(repo) == []
    after = _outputs_state(repo)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}   # same bytes


@pytest.mark.slow
def test_smoke_a_changed_epoch_count_reruns_exactly_its_runs_and_their_tables(smoke_clone):
    """Table 3's stage-2 epochs 1 -> 2 in the profile: a dry run of `all` plans exactly the
    Table 3 runs that train for that many epochs, the runs that start from them, Table 3, the
    reproduction report and metrics.json that read it, and `all`; nothing else (enumerated here
    from the profile)."""
    repo = smoke_clone["repo"]
    path = repo / "config" / "smoke.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    t3 = cfg["experiments"]["table3"]
    methods = set(t3["methods"]) | {CATALOG[m].starts_from for m in t3["methods"]} - {None}
    changed = {m for m in methods if CATALOG[m].epochs == "stage2_epochs"}
    changed |= {m for m in methods if CATALOG[m].starts_from in changed}
    assert changed and changed != methods                   # the edit must leave some runs alone
    t3["stage2_epochs"] = 2
    try:
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        jobs = _planned_jobs(repo)
    finally:
        path.write_text(original)
    runs = {Path(out).parent.name for rule, out in jobs if rule == "train"}
    dirs = {str(Path(out).parent.parent) for rule, out in jobs if rule == "train"}
    assert runs == changed, jobs
    assert dirs == {f"results/runs/smoke/students/table3/r1/{a}/seed{s}" for a in t3["students"] for s in cfg["seeds"]}
    assert sorted(rule for rule, _ in jobs if rule != "train") == ["all", "metrics_json", "reproduction", "table3"], jobs
    assert _planned_jobs(repo) == []                        # the profile restored: nothing to do



@pytest.mark.slow
def test_smoke_chaos_run_killed_three_times_ends_with_the_outputs_of_the_uninterrupted_run(smoke_clone, tmp_path):
    """scripts/chaos.py kills the smoke workflow 3 times (Snakemake with its jobs, a training job
    with SIGKILL, or one with SIGTERM then SIGKILL; kinds and moments from the seed), resumes
    each time as docs/troubleshooting.md says, and compares with this module's uninterrupted
    smoke run: tables, figure data, every model.pt and metrics.csv identical, no finished run
    trained again. Its exit status says so; the printed counts are checked too."""
    proc = run([sys.executable, ROOT / "scripts" / "chaos.py", "--kills", 3, "--seed", 26, "--gap", 3, 12,
                "--reference", smoke_clone["repo"], "--workdir", tmp_path / "chaos"], cwd=ROOT, timeout=1500,
               check=False)
    out = proc.stdout
    assert proc.returncode == 0, f"chaos.py failed ({proc.returncode}):\n{out[-6000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"^seed 26; 3 kills: snakemake 1, job 1, job-term 1$", out, re.M), out   # drawn from the seed
    assert "runs retrained after their summary.json: 0" in out and "result: identical outputs" in out, out
    compared = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (tables|figure data|model.pt|metrics.csv)",
                                                           out.split("compared: ")[1].splitlines()[0]))
    # every run of the chaos workflow was compared (the reference may hold more: the tests before
    # this one built `claims` in it too)
    runs = [p for p in (tmp_path / "chaos" / "chaos" / "wf" / "results" / "runs").rglob("model.pt")
            if ".finished" not in p.parts]
    reference = [p for p in (smoke_clone["repo"] / "results" / "runs").rglob("model.pt") if ".finished" not in p.parts]
    assert compared["model.pt"] == len(runs) > 0 and len(runs) <= len(reference), (compared, len(runs), len(reference))
    assert compared["tables"] >= len(TABLE_FILES), compared


# ------------------------------------------------------------------------------------------------
# What DVC users look at: dvc metrics, dvc plots, dvc exp; the report and the plots in a browser.
# These run before the push/pull round trip below (it deletes the outputs and pulls them back).
# ------------------------------------------------------------------------------------------------

def _expected_metrics(repo: Path) -> dict[tuple, tuple[float, int]]:
    """Every table cell and AUC as metrics.json should hold it, computed here from the long CSVs:
    (table, experiment, r<ratio>, student, method[, accuracy]) -> (mean over seeds, seeds)."""
    values: dict[tuple, list[float | None]] = {}
    for table, column in (("table1", "test_acc"), ("table2", "test_acc"), ("table3", "test_acc"),
                          ("table4", "ncm_acc"), ("table_h", "H"), ("table_h", "acc_new")):
        for row in _read(repo / "results" / f"{table}_long.csv"):
            parts = Path(row["summary"]).parts
            exp = row.get("experiment") or parts[parts.index("students") + 1]
            method = f"k_hat={row['k_hat']}" if table == "table4" else row["method"]
            key = (table, exp, f"r{row['ratio']}", row["arch"], method) + ((column,) if table == "table_h" else ())
            values.setdefault(key, []).append(float(row[column]))
    for row in _read(repo / "results" / "lambda_auc.csv"):
        # no AUC where the student has no unseen class (r = 1)
        values.setdefault(("lambda_auc", f"r{row['ratio']}", row["arch"], "auc"), []).append(
            float(row["auc"]) if row["auc"] else None)
    mean = lambda v: statistics.fmean(x for x in v if x is not None) if any(x is not None for x in v) else None
    return {k: (mean(v), len(v)) for k, v in values.items()}


def _check_metrics(data: dict, expected: dict) -> None:
    for key, (mean, n) in expected.items():
        leaf = data
        for k in key:
            assert k in leaf, f"{key}: no {k!r} in metrics.json"
            leaf = leaf[k]
        # DVC drops null values: no mean where no seed has one (AUC at r = 1)
        assert (leaf.get("mean") is None if mean is None else leaf.get("mean") == pytest.approx(mean, abs=1e-4)) \
            and leaf["n_seeds"] == n, (key, leaf, mean, n)


@pytest.mark.slow
def test_smoke_dvc_metrics_show_every_table_cell_and_the_auc(smoke_clone):
    repo = smoke_clone["repo"]
    expected = _expected_metrics(repo)
    cfg = profile("smoke")
    assert len([k for k in expected if k[0] == "table1"]) == \
        len(cfg["experiments"]["table1"]["ratios"]) * len(cfg["experiments"]["table1"]["students"]) * len(METHODS)
    shown = json.loads(run([BIN / "dvc", "metrics", "show", "--json"], cwd=repo).stdout)
    (workspace,) = shown.values()            # one revision: the workspace ("" before the first commit)
    data = workspace["data"]["results/metrics.json"]["data"]
    assert data["profile"] == "smoke"
    _check_metrics(data, expected)
    text = run([BIN / "dvc", "metrics", "show"], cwd=repo).stdout            # the table people read
    for key, (mean, _) in expected.items():
        assert mean is None or ".".join(key + ("mean",)) in text, key


def _offline_plots_template(tmp: Path) -> Path:
    """`dvc plots show --html-template`: DVC's page loads Vega from a CDN; this one inlines the
    same libraries (Vega 5, Vega-Lite 5, vega-embed 6, as Snakemake's report ships them), so the
    page renders without a network, and it renders charts as SVG so their text is in the DOM."""
    import snakemake

    assets = Path(snakemake.__file__).parent / "assets" / "data"
    scripts = "".join(f"<script>{(assets / lib / f'{lib}.js').read_text()}</script>\n"
                      for lib in ("vega", "vega-lite", "vega-embed"))
    svg = ("<script>const dvcEmbed = vegaEmbed;\n"
           "vegaEmbed = (el, spec, opt) => dvcEmbed(el, spec, Object.assign({renderer: 'svg'}, opt));</script>")
    path = tmp / "offline_template.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>DVC plots</title>{scripts}{svg}"
                    "</head><body>{plot_divs}</body></html>")
    return path


@pytest.mark.slow
@needs_chromium
def test_smoke_dvc_plots_show_renders_every_curve_and_figure_in_a_browser(smoke_clone, tmp_path):
    repo = smoke_clone["repo"]
    out = tmp_path / "dvc_plots"
    run([BIN / "dvc", "plots", "show", "--html-template", _offline_plots_template(tmp_path), "-o", out], cwd=repo)
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    images = [p for p in declared if isinstance(p, str) and p.endswith(".png")]
    curves = []
    for p in declared:
        if isinstance(p, dict):
            title, spec = next(iter(p.items()))
            (path, _), = spec["y"].items()
            # the gain-vs-data curve only where the claims ran (the claims test before this one)
            if path != "results/gain_vs_data.csv" or (repo / path).is_file():
                curves.append(title)
    assert len(curves) >= 3 and len(images) == 3, (curves, images)
    with chromium.Browser(tmp_path / "chromium") as browser:
        # vega-embed renders each chart asynchronously: wait until every chart has drawn its marks
        ready = ("Array.from(document.querySelectorAll('.vega-embed svg')).filter(s => "
                 "s.querySelectorAll('g.mark-symbol path, g.mark-line path').length > 0).length "
                 f">= {len(curves)}")
        browser.open((out / "index.html").as_uri(), ready)
        charts = browser.evaluate("Array.from(document.querySelectorAll('.vega-embed svg')).map(s => "
                                  "({text: s.textContent, marks: s.querySelectorAll('g.mark-symbol path, "
                                  "g.mark-line path').length}))")
        shown = browser.evaluate("Array.from(document.images).map(i => ({src: i.src, width: i.naturalWidth}))")
        errors = browser.errors()
        browser.screenshot(tmp_path / "dvc_plots.png")
    assert errors == []
    for title in curves:                   # each chart once, with its title and its points or lines drawn
        chart = [c for c in charts if title in c["text"]]
        assert len(chart) == 1 and chart[0]["marks"] >= 1, (title, charts)
    for name in images:
        assert [i for i in shown if i["src"].endswith(Path(name).name) and i["width"] > 0], (name, shown)


@pytest.mark.slow
def test_smoke_dvc_exp_run_lists_the_smoke_experiment_with_its_metrics(smoke_clone):
    """`dvc exp run -S profile=smoke` from a commit whose dvc.lock records the outputs (`dvc repro`
    then commit, as a user does: exp run first checks out the baseline's outputs and deletes
    those its dvc.lock does not record), so nothing reruns. `dvc exp show` lists the
    experiment with the profile as its parameter and metrics.json's cells."""
    repo = smoke_clone["repo"]
    run([BIN / "dvc", "repro"], cwd=repo, timeout=900)       # Snakemake finds everything made
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    run(git + ["add", "-A"], cwd=repo)
    run(git + ["commit", "-q", "-m", "the smoke clone, dvc.lock"], cwd=repo)
    before = _outputs_state(repo)
    ran = run([BIN / "dvc", "exp", "run", "-S", "profile=smoke"], cwd=repo, timeout=900)
    assert "Ran experiment" in ran.stdout + ran.stderr, (ran.stdout + ran.stderr)[-3000:]
    assert _outputs_state(repo) == before                  # nothing deleted, retrained or rewritten
    rows = json.loads(run([BIN / "dvc", "exp", "show", "--json"], cwd=repo).stdout)
    exps = [e for base in rows for e in (base.get("experiments") or []) for e in e["revs"]]
    assert len(exps) == 1, rows
    data = exps[0]["data"]
    assert data["params"]["params.yaml"]["data"]["profile"] == "smoke"
    _check_metrics(data["metrics"]["results/metrics.json"]["data"], _expected_metrics(repo))


@pytest.mark.slow
def test_smoke_dvc_repro_push_pull_round_trip(smoke_clone):
    repo, remote = smoke_clone["repo"], smoke_clone["remote"]
    dvc = BIN / "dvc"
    # the default remote is a local directory beside the clone (../dvc-remote)
    assert Path(run([dvc, "remote", "list"], cwd=repo).stdout.split()[1]).resolve() == remote.resolve()
    run([dvc, "repro"], cwd=repo, timeout=900)           # Snakemake finds everything made: nothing retrains
    status = run([dvc, "status"], cwd=repo).stdout
    assert "changed" not in status and "modified" not in status, status
    outs = ["data/raw"] + _dvc_outs("smoke")
    before = _checksums(repo, outs)
    assert any(k.endswith("model.pt") for k in before) and any(k.startswith("figures/") for k in before)
    run([dvc, "push"], cwd=repo, timeout=600)
    # a fresh clone: no cache, no outputs; then dvc pull
    shutil.rmtree(repo / ".dvc" / "cache")
    for o in outs:
        p = repo / o
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(repo / ".snakemake", ignore_errors=True)
    run([dvc, "pull"], cwd=repo, timeout=600)
    after = _checksums(repo, outs)
    assert after == before                                # nothing lost, byte for byte
    # DVC does not restore mtimes: --touch, then Snakemake has nothing to do
    snakemake(["all", "--touch", "--cores", "1"], snakefile=repo / "Snakefile", workdir=repo)
    out = snakemake(["all", "-n"], snakefile=repo / "Snakefile", workdir=repo)
    assert "Nothing to be done" in out.stdout + out.stderr, out.stdout[-3000:]
