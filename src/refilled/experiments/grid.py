"""The runs a profile's targets need, as data (pure Python, no torch, no Snakemake).

The one enumeration of the grid: `workflow/rules/common.smk`'s input functions (table_runs,
table4_runs, figure*_runs, gain_runs, table_h_runs, teacher_dir, ...) call these functions of
a loaded profile (`refilled.experiments.profile.load_profile`), and `refilled plan` lists, counts and costs
the same runs without building Snakemake's DAG. A `Run`'s `path` is its directory under
`results/runs/<profile>/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refilled.data.splits import NUM_CLASSES
from refilled.experiments.profile import fmt, gain_points, k_hat_value, method_values
from refilled.methods import CATALOG
from refilled.methods.catalog import TEACHER_METHOD, applies

TEACHER_RUN = "teachers/{exp}/seed{seed}"
STUDENT_RUN = "students/{exp}/r{ratio}/{arch}/seed{seed}/{method}{tag}{joint}"
REFERENCE_RUN = "students/{exp}/r{ratio}/{arch}/seed{seed}/reference"
JOINT = "-joint"
TABLE_EXPERIMENTS = ("table1", "table2", "table3")


class GridError(ValueError):
    """A target the grid does not know; the message names it."""


@dataclass(frozen=True)
class Run:
    """One job of the workflow that trains (kind "teacher" or "student") or only evaluates
    (kind "reference": Table H's training-free reference; "teacher_ncm": the gain sweep's
    teacher NCM). `swept`: the hyper-parameters set by the target (Table 4's k_hat, Figure 2's
    lam), as (key, value) pairs; `path`: the run directory under results/runs/<profile>/."""

    kind: str
    exp: str
    seed: int
    arch: str
    method: str
    ratio: float | None = None
    swept: tuple = ()
    joint: bool = False
    path: str = field(default="", compare=False)

    @property
    def trains(self) -> bool:
        return self.kind in ("teacher", "student")


def teacher_exp(cfg: dict, exp: str) -> str:
    """The experiment whose teacher `exp` uses (the gain sweep's points share their base's)."""
    return cfg["experiments"][exp].get("teacher_of", exp)


def teacher_ratio(cfg: dict, exp: str) -> float:
    """The ratio of the split a teacher trains on: 0, or 1 where h is more than half the classes."""
    e = cfg["experiments"][exp]
    return 0 if 2 * e["classes_per_task"] <= NUM_CLASSES[e["dataset"]] else 1


def teacher_run(cfg: dict, exp: str, seed: int) -> Run:
    base = teacher_exp(cfg, exp)
    return Run("teacher", base, seed, cfg["experiments"][base]["teacher"]["arch"], TEACHER_METHOD,
               ratio=teacher_ratio(cfg, base), path=TEACHER_RUN.format(exp=base, seed=seed))


def run_name(cfg: dict, method: str, **swept) -> str:
    """`method`'s run directory name in profile `cfg` (its swept hyper-parameters spelled in it)."""
    return CATALOG[method].run_name(method_values(cfg, method, **swept))


def student_run(cfg: dict, exp: str, ratio, arch: str, seed: int, method: str, joint: bool = False,
                **swept) -> Run:
    """The run of `method` for one cell at the profile's hyper-parameters (`swept` overrides some)."""
    name = run_name(cfg, method, **swept)
    path = STUDENT_RUN.format(exp=exp, ratio=fmt(ratio), arch=arch, seed=seed, method=name, tag="",
                              joint=JOINT if joint else "")
    return Run("student", exp, seed, arch, method, ratio=float(ratio), swept=tuple(sorted(swept.items())),
               joint=joint, path=path)


def reference_run(cfg: dict, exp: str, ratio, arch: str, seed: int) -> Run:
    return Run("reference", exp, seed, arch, "reference", ratio=float(ratio),
               path=REFERENCE_RUN.format(exp=exp, ratio=fmt(ratio), arch=arch, seed=seed))


def teacher_ncm_run(cfg: dict, exp: str, ratio, seed: int) -> Run:
    base = teacher_exp(cfg, exp)
    return Run("teacher_ncm", exp, seed, cfg["experiments"][base]["teacher"]["arch"], "teacher_ncm",
               ratio=float(ratio), path=f"teacher_ncm/{exp}/r{fmt(ratio)}/seed{seed}.json")


# ---- the runs behind each table and figure (common.smk's functions of the same names) ----
def table_methods(cfg: dict, exp: str) -> list[str]:
    listed = cfg["experiments"][exp].get("methods")
    return list(listed) if listed else [m for m, e in CATALOG.items() if e.in_tables]


def table_runs(cfg: dict, exp: str) -> list[Run]:
    e = cfg["experiments"][exp]
    return [student_run(cfg, exp, r, a, s, m) for r in e["ratios"] for m in table_methods(cfg, exp)
            if applies(m, r) for a in e["students"] for s in cfg["seeds"]]


def table4_runs(cfg: dict) -> list[Run]:
    t4 = cfg["table4"]
    return [student_run(cfg, t4["experiment"], r, t4["arch"], s, t4["method"], k_hat=k_hat_value(k))
            for r in t4["ratios"] for k in t4["k_hats"] for s in cfg["seeds"]]


def figure1_runs(cfg: dict) -> list[Run]:
    f = cfg["figure1"]
    return [student_run(cfg, f["experiment"], f["ratio"], f["arch"], f["seed"], m)
            for m in (CATALOG[f["method"]].starts_from, f["method"])]


def figure2_runs(cfg: dict) -> list[Run]:
    f = cfg["figure2"]
    return [student_run(cfg, f["experiment"], f["ratio"], a, s, f["method"], lam=lam)
            for a in cfg["experiments"][f["experiment"]]["students"] for lam in f["lams"] for s in cfg["seeds"]]


def figure3_runs(cfg: dict) -> list[Run]:
    f = cfg["figure3"]
    return [student_run(cfg, f["experiment"], r, f["arch"], s, f["method"], lam=f["lam"])
            for r in f["ratios"] for s in cfg["seeds"]]


def gain_runs(cfg: dict) -> list[Run]:
    g = cfg.get("gain_vs_data")
    return [student_run(cfg, exp, r, g["arch"], s, m) for exp in gain_points(cfg).values() for r in g["ratios"]
            for m in g["methods"] if applies(m, r) for s in cfg["seeds"]] if g else []


def teacher_ncm_runs(cfg: dict) -> list[Run]:
    g = cfg.get("gain_vs_data")
    return [teacher_ncm_run(cfg, exp, r, s) for exp in gain_points(cfg).values() for r in g["ratios"]
            for s in cfg["seeds"]] if g else []


def table_h_grid(cfg: dict) -> list[tuple[str, list, list]]:
    th = cfg["table_h"]
    exps = cfg["experiments"]
    return [(e, th["ratios"] or exps[e]["ratios"], th["students"] or exps[e]["students"]) for e in th["experiments"]]


def table_h_runs(cfg: dict) -> list[Run]:
    """Table H's joint-head runs, then its references."""
    cells = [(e, r, a, s) for e, ratios, archs in table_h_grid(cfg) for r in ratios for a in archs
             for s in cfg["seeds"]]
    return ([student_run(cfg, e, r, a, s, m, joint=True) for e, r, a, s in cells for m in cfg["table_h"]["methods"]]
            + [reference_run(cfg, e, r, a, s) for e, r, a, s in cells])


def claims_runs(cfg: dict) -> list[Run]:
    """What `results/claims.{csv,md}` reads: its tables, Table 4, Figure 3's runs (lambda AUC), Figure 2's."""
    if not cfg.get("claims"):
        raise GridError("this profile has no claims section (config/claims.yaml has one)")
    return ([r for t in cfg["claims"]["tables"] for r in table_runs(cfg, t)] + table4_runs(cfg)
            + figure3_runs(cfg) + figure2_runs(cfg))


# ---- dependencies: what a run reads (common.smk's train_inputs and the reference rule) ----
def needs(cfg: dict, run: Run) -> list[Run]:
    """The runs `run` reads: the seed's teacher, the run it starts from, a reference's student."""
    if run.kind == "teacher":
        return []
    if run.kind in ("reference", "teacher_ncm"):
        plain = [] if run.kind == "teacher_ncm" else [student_run(cfg, run.exp, run.ratio, run.arch, run.seed, "student")]
        return [teacher_run(cfg, run.exp, run.seed)] + plain
    entry = CATALOG[run.method]
    out = [teacher_run(cfg, run.exp, run.seed)] if entry.teacher or run.joint else []
    if entry.starts_from:   # at the profile's hyper-parameters: the swept runs share it
        out.append(student_run(cfg, run.exp, run.ratio, run.arch, run.seed, entry.starts_from))
    return out


def closure(cfg: dict, runs: list[Run]) -> list[Run]:
    """`runs` and everything they read, each once, dependencies before the runs that read them."""
    seen: dict[str, Run] = {}

    def visit(run: Run) -> None:
        key = f"{run.kind}:{run.path}"
        if key in seen:
            return
        for dep in needs(cfg, run):
            visit(dep)
        seen[key] = run

    for run in runs:
        visit(run)
    return list(seen.values())


# ---- Snakemake targets -> the runs they need ----
def _everything(cfg: dict) -> list[Run]:
    exps = cfg["experiments"]
    return ([teacher_run(cfg, e, s) for e in exps for s in cfg["seeds"]]
            + [r for e in exps for r in table_runs(cfg, e)] + table4_runs(cfg) + figure1_runs(cfg)
            + figure2_runs(cfg) + figure3_runs(cfg) + table_h_runs(cfg) + gain_runs(cfg) + teacher_ncm_runs(cfg))


def target_runs(cfg: dict, target: str, profile: str) -> list[Run]:
    """The runs (without their dependencies) behind one Snakemake target of profile `profile`:
    a rule name of the Snakefile's coarse targets (all, data, teachers, students, tables,
    figures, claims), an output under results/ or figures/, or a run directory's file."""
    tables = [r for t in TABLE_EXPERIMENTS for r in table_runs(cfg, t)] + table4_runs(cfg)
    figures = figure1_runs(cfg) + figure2_runs(cfg) + figure3_runs(cfg)
    gain = gain_runs(cfg) + teacher_ncm_runs(cfg)
    named = {
        "all": tables + table_h_runs(cfg) + figures,
        "data": [],
        "teachers": [teacher_run(cfg, e, s) for e in cfg["experiments"] for s in cfg["seeds"]],
        "students": ([r for e in cfg["experiments"] for r in table_runs(cfg, e)] + table4_runs(cfg) + figures
                     + table_h_runs(cfg)),
        "tables": tables + table_h_runs(cfg),
        "figures": figures,
        "metrics": tables + table_h_runs(cfg) + figures,   # results/metrics.json and the plot CSVs
        "results/metrics.json": tables + table_h_runs(cfg) + figure3_runs(cfg),
        "claims": (claims_runs(cfg) + gain) if cfg.get("claims") else None,
        "results/reproduction": tables,
        "results/lambda_auc.csv": figure3_runs(cfg),
        "results/table4": table4_runs(cfg),
        "results/table_h": table_h_runs(cfg),
        "figures/figure1_convergence": figure1_runs(cfg),
        "figures/figure2_lambda_sweep": figure2_runs(cfg),
        "figures/figure3_lambda_hist": figure3_runs(cfg),
        "results/gain_vs_data.csv": gain if cfg.get("gain_vs_data") else None,
        "figures/gain_vs_data": gain if cfg.get("gain_vs_data") else None,
        "results/claims": claims_runs(cfg) if cfg.get("claims") else None,
        **{f"results/{t}": table_runs(cfg, t) for t in TABLE_EXPERIMENTS},
    }
    stem = target.strip().rstrip("/")
    for suffix in ("_long.csv", ".csv", ".md", ".png", ".pdf"):
        if stem.endswith(suffix) and stem not in named:
            stem = stem[: -len(suffix)]
            break
    if stem in named:
        if named[stem] is None:
            raise GridError(f"target {target!r}: profile {profile} has no section for it (claims / gain_vs_data)")
        return named[stem]
    prefix = f"results/runs/{profile}/"
    if target.startswith(prefix):
        rel = target[len(prefix):]
        for run in _everything(cfg):
            if rel == run.path or rel.startswith(run.path + "/"):
                return [run]
    raise GridError(f"unknown target {target!r} for profile {profile}: give all, data, teachers, students, tables, "
                    f"figures, claims, a table or figure file (e.g. results/table2.csv), or a run directory's file "
                    f"under {prefix}")


def runs_for(cfg: dict, targets: list[str], profile: str) -> list[Run]:
    """Every run the targets need, dependencies included, each once (dependencies first)."""
    return closure(cfg, [r for t in (targets or ["all"]) for r in target_runs(cfg, t, profile)])
