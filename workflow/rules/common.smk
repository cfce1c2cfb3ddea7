# Configuration, path patterns and input functions shared by every rule (defined once).
# Pure Python: nothing here imports torch (the scheduler process stays light).

import functools
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

BASE = Path(workflow.basedir)
sys.path.insert(0, f"{BASE}/src")
from refilled.experiments import grid  # noqa: E402
from refilled.tools import forkserver  # noqa: E402
from refilled.models.archs import ARCH_PATTERN  # noqa: E402
from refilled.experiments.grid import JOINT, REFERENCE_RUN, STUDENT_RUN, TEACHER_RUN  # noqa: E402
from refilled.experiments.profile import ConfigError, fmt, k_hat_value, load_profile, method_values  # noqa: E402
from refilled.methods import CATALOG  # noqa: E402
from refilled.methods.catalog import TEACHER_METHOD  # noqa: E402
from refilled.tools.pin import count_gpus  # noqa: E402
from refilled.report.reproduction import paper_counterpart  # noqa: E402


# ---- configuration: params.yaml (profile name) -> config/<profile>.yaml, validated ----
_unknown = sorted(set(config) - {"profile", "forkserver"})
if _unknown:
    raise WorkflowError(f"params.yaml / --config: unknown key(s) {', '.join(map(repr, _unknown))}; the keys are "
                        "'profile' (every number lives in config/<profile>.yaml) and 'forkserver' (on or off)")
PROFILE = str(config.get("profile", "demo"))
try:
    P = load_profile(BASE, PROFILE)
except ConfigError as exc:
    raise WorkflowError(f"configuration error: {exc}") from None

EXPS = P["experiments"]
SEEDS = P["seeds"]
LAM = P["lam"]

# The rules call `refilled` by name, from the environment of the Python running Snakemake
# (.venv/bin/snakemake works without activating the venv). Neither that path nor the repository's
# location nor the GPU slots (`refilled pin`'s flags, scheduling only) may be params of a rule. Snakemake
# records params and reruns a job whose params differ, and a moved checkout, another venv or another
# gpu_slots_per_gpu changes no result. They reach every job's shell through SHELL_PREFIX (the
# Snakefile's shell.prefix), which Snakemake neither records nor compares.
_SHELL_ENV = f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\" REFILLED_REPO={shlex.quote(str(BASE))}"

# ---- where things go (seeds explicit in every path that depends on them) ----
DATA = f"data/prepared/{PROFILE}"           # data rule's outputs: <dataset>.json (+ the subsample, if any)
# the data root every run reads: the subsample the data rule writes, or data/raw itself
DATA_ROOT = DATA if P["test_per_class"] or P["train_per_class"] else "data/raw"
RUNS = f"results/runs/{PROFILE}"            # run directories: metrics.csv, model.pt, summary.json
LOGS = f"results/logs/{PROFILE}"
BENCH = f"results/benchmarks/{PROFILE}"
# run directory patterns (tag: the swept hyper-parameters; joint: "-joint" for a Table H run) from
# refilled.experiments.grid, which also enumerates the runs each table and figure needs (below, and `refilled plan`)
RUN_FILES = ("summary.json", "model.pt", "metrics.csv")                    # what every run declares


# ---- GPUs: each training job declares gpu=1; `refilled pin` picks a free GPU slot at run time ----
GPUS = P["gpus"]                       # passed to `refilled pin` (auto: counted on the node that runs the job)
SLOTS = P["gpu_slots_per_gpu"]
N_GPUS = count_gpus("auto") if GPUS == "auto" else int(GPUS)

# ---- a warm `refilled` for the jobs of a local run (refilled.tools.forkserver; the Snakefile's onstart) ----
# It saves each training job the seconds of importing torch; results are those of a fresh process.
# Off with `--config forkserver=off`; never on a cluster (the jobs run elsewhere).
_FORKSERVER_SETTING = str(config.get("forkserver", "on")).lower()
if _FORKSERVER_SETTING not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
    raise WorkflowError(f"configuration error: forkserver must be on or off, got {config['forkserver']!r}")
USE_FORKSERVER = (_FORKSERVER_SETTING in ("on", "true", "1", "yes") and workflow.local_exec
                  and not workflow.dryrun and not workflow.touch)
_FORKSERVER_ENV = f" REFILLED_FORKSERVER={forkserver.SOCKET_NAME}" if USE_FORKSERVER else ""
SHELL_PREFIX = f"{_SHELL_ENV}{_FORKSERVER_ENV} REFILLED_PIN='--gpus {GPUS} --per-gpu {SLOTS}'; "
if N_GPUS > 0 and "gpu" not in workflow.global_resources and not workflow.non_local_exec:
    # (on a cluster the GPUs of the submitting node say nothing about the cluster's)
    # a local run never starts more GPU jobs than slots; `--resources gpu=N` on the command line wins
    workflow.register_resource("gpu", N_GPUS * SLOTS)


# ---- path helpers (the rules and the targets use the same ones) ----
def split_file(exp, ratio, seed):
    e = EXPS[exp]
    order = e.get("class_order", "seeded")
    return f"data/splits/{e['dataset']}/{order}/h{e['classes_per_task']}/r{fmt(ratio)}/seed{seed}.json"


def teacher_ratio(exp):
    return grid.teacher_ratio(P, exp)


def data_ready(exp):
    return f"{DATA}/{EXPS[exp]['dataset']}.json"


def _dirs(runs):
    return [f"{RUNS}/{r.path}" for r in runs]


def teacher_dir(exp, seed):
    return f"{RUNS}/{grid.teacher_run(P, exp, seed).path}"


def run_dir(exp, ratio, arch, seed, method, joint=False, **swept):
    """The run of `method` for one cell, at the profile's hyper-parameters (`swept` overrides some);
    `joint`: the run with the joint head (its own run: the head changes the backbone's training)."""
    return f"{RUNS}/{grid.student_run(P, exp, ratio, arch, seed, method, joint, **swept).path}"


def reference_dir(exp, ratio, arch, seed):
    return f"{RUNS}/{grid.reference_run(P, exp, ratio, arch, seed).path}"


def tag_values(method, tag):
    """The swept hyper-parameters spelled in a run directory's tag, e.g. '_lam0.5' -> {'lam': '0.5'}."""
    prefixes = CATALOG[method].path
    values = {}
    for part in filter(None, tag.split("_")):
        key = next((k for k, p in prefixes.items() if part.startswith(p)), None)
        if key is None:
            raise WorkflowError(f"run directory {method}{tag}: {part!r} is not a swept hyper-parameter of {method} "
                                f"(its run names spell {', '.join(prefixes.values()) or 'nothing'})")
        values[key] = part[len(prefixes[key]):]
    return values


# ---- inputs and flags of the training rule (train.smk) ----
def train_inputs(wc):
    entry = CATALOG[wc.method]
    inputs = {"split": split_file(wc.exp, wc.ratio, wc.seed), "data": data_ready(wc.exp)}
    if entry.teacher or wc.joint:     # the joint head learns from the teacher's own head
        inputs["teacher"] = f"{teacher_dir(wc.exp, wc.seed)}/model.pt"
    if entry.starts_from:
        inputs["init"] = f"{run_dir(wc.exp, wc.ratio, wc.arch, wc.seed, entry.starts_from)}/model.pt"
    return inputs


def train_sets(wc):
    """--set for every hyper-parameter the profile or the directory name fixes."""
    values = method_values(P, wc.method, **tag_values(wc.method, wc.tag))
    name = CATALOG[wc.method].run_name(values)
    if name != f"{wc.method}{wc.tag}":   # e.g. lam1.0 for lam1: one spelling per run
        raise WorkflowError(f"run directory {wc.method}{wc.tag} should be spelled {name}")
    hp = CATALOG[wc.method].settable
    sets = [f"--set {k}={hp[k].format(v)}" for k, v in values.items() if k in hp]
    return " ".join(sets + ([joint_args()] if wc.joint else []))


def joint_args():
    """The joint head's flags, from the profile's table_h section."""
    th = P["table_h"]
    n = th["test_per_class"]
    per_class = "" if n is None else f" --joint-test-per-class {n}"
    return f"--joint-head {fmt(th['weight'])} --joint-T {fmt(th['T'])}{per_class}"


def train_flags(wc, input):
    return " ".join(f"--{k} {getattr(input, k)}" for k in ("teacher", "init") if hasattr(input, k))


def summaries(dirs):
    return [f"{d}/summary.json" for d in dirs]


def per_class_arg(n):
    return "" if n is None else f"--per-class {n}"


def common_args(exp, run=None, recipe=None):
    """Flags every training run of this profile shares (numbers only); `recipe` is the teacher's
    or the experiment's dict holding batch_size / milestones overrides. The runs behind Figure 1
    evaluate after every epoch (its curves); that changes no reported number."""
    recipe = EXPS[exp] if recipe is None else recipe
    every = 1 if run in figure1_runs() else P["eval_every"]
    milestones = recipe.get("milestones")
    return (f"--data-root {DATA_ROOT} --no-checksum --batch-size {recipe.get('batch_size', P['batch_size'])} "
            f"--num-workers {P.get('num_workers', 0)} --dropout {EXPS[exp].get('dropout', 0)} "
            + (f"--milestones {' '.join(fmt(m) for m in milestones)} " if milestones else "")
            + (f"--val-per-class {EXPS[exp]['val_per_class']} " if recipe is EXPS[exp] and EXPS[exp].get("val_per_class")
               else "")
            + (f"--gamma {fmt(recipe['gamma'])} " if "gamma" in recipe else "")
            + f"--eval-every {every} --device {P['device']} --profile {PROFILE}")


# ---- the runs behind each table and figure (refilled.experiments.grid) ----
def table_methods(exp):
    return grid.table_methods(P, exp)


def table_runs(exp):
    return _dirs(grid.table_runs(P, exp))


def table4_runs():
    return _dirs(grid.table4_runs(P))


@functools.cache
def figure1_runs():
    return _dirs(grid.figure1_runs(P))


def figure2_runs():
    return _dirs(grid.figure2_runs(P))


def figure3_runs():
    return _dirs(grid.figure3_runs(P))


# ---- the claims (claims.smk) ----
def gain_runs():
    return _dirs(grid.gain_runs(P))


def teacher_ncm_files():
    return _dirs(grid.teacher_ncm_runs(P))


def claims_inputs(wc):
    c = P.get("claims")
    if not c:
        raise WorkflowError(f"profile {PROFILE} has no claims section (config/claims.yaml has one)")
    return {"tables": [f"results/{t}_long.csv" for t in c["tables"]], "table4": "results/table4_long.csv",
            "auc": "results/lambda_auc.csv", "sweep": summaries(figure2_runs())}


GAIN_OUTPUTS = ["results/gain_vs_data.csv", "figures/gain_vs_data.png", "figures/gain_vs_data.pdf"]
def table_h_grid():
    """[(experiment, ratios, students)] of Table H: the table_h section, defaulting to each experiment's grid."""
    return grid.table_h_grid(P)


def table_h_runs():
    """Table H's joint-head runs, then its references (each from the plain Student run of its cell)."""
    return _dirs(grid.table_h_runs(P))


def table_rule_params(exp):
    e = EXPS[exp]
    return {"ratios": " ".join(fmt(r) for r in e["ratios"]), "columns": " ".join(e["students"]),
            "methods": " ".join(table_methods(exp))}


def reproduction_tables():
    """(table, dataset, students as ours=paper's, comma-separated) of our Tables 1-4, for `refilled reproduction`."""
    t4 = P["table4"]
    students = lambda table, exp, archs: ",".join(
        f"{a}={paper_counterpart(table, a, EXPS[exp]['teacher']['arch']) or ''}" for a in archs)
    return [(e[-1], EXPS[e]["dataset"], students(e[-1], e, EXPS[e]["students"])) for e in ("table1", "table2", "table3")] + \
        [("4", EXPS[t4["experiment"]]["dataset"], students("4", t4["experiment"], [t4["arch"]]))]


TABLES = [f"results/table{t}{suffix}" for t in (1, 2, 3, 4, "_h") for suffix in (".csv", "_long.csv", ".md")] + \
    ["results/reproduction.csv", "results/reproduction.md"]
FIGURES = [f"figures/{name}.{ext}" for name in ("figure1_convergence", "figure2_lambda_sweep", "figure3_lambda_hist")
           for ext in ("png", "pdf")]

# workflow/envs/refilled.yaml, as the rule files beside this one spell it
CONDA_ENV = "../envs/refilled.yaml"
