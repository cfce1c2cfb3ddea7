# The REFILLED workflow: every table and figure of the supplement from one command.
#
#   snakemake --cores 8 results/table2.csv                 # default profile (params.yaml: demo)
#   snakemake --cores 8 --config profile=paper all         # another profile from config/
#   snakemake --report report.html                         # tables and figures on one page
#
# This file is thin: read and validate the configuration, define paths, include one .smk
# per stage (workflow/rules/). Every rule runs one `refilled` command; nothing here imports
# torch. See the README, section "Workflow".

import os
import shutil
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

BASE = Path(workflow.basedir)
sys.path.insert(0, str(BASE / "src"))
from refilled.config import (  # noqa: E402  (pure Python, no torch)
    METHODS, VARIANTS, ConfigError, fmt, k_hat_value, load_profile,
)


configfile: str(BASE / "params.yaml")


# ---- configuration: params.yaml (profile name) -> config/<profile>.yaml, validated ----
_unknown = sorted(set(config) - {"profile"})
if _unknown:
    raise WorkflowError(f"params.yaml / --config: unknown key(s) {', '.join(map(repr, _unknown))}; the only key is "
                        "'profile' (every number lives in config/<profile>.yaml)")
PROFILE = str(config.get("profile", "demo"))
try:
    P = load_profile(BASE, PROFILE)
except ConfigError as exc:
    raise WorkflowError(f"configuration error: {exc}") from None

EXPS = P["experiments"]
SEEDS = P["seeds"]
LAM = P["lam"]
KHAT = k_hat_value(P["k_hat"])

# `refilled` beside the Python running Snakemake (.venv/bin/snakemake works without activating the venv)
_beside = Path(sys.executable).parent / "refilled"
REFILLED = str(_beside) if _beside.is_file() else "refilled"

# ---- where things go (seeds explicit in every path that depends on them) ----
DATA = f"data/prepared/{PROFILE}"           # data rule's outputs: <dataset>.json (+ the subsample, if any)
# the data root every run reads: the subsample the data rule writes, or data/raw itself
DATA_ROOT = DATA if P["test_per_class"] or P["train_per_class"] else "data/raw"
RUNS = f"results/runs/{PROFILE}"            # run directories: metrics.csv, model.pt, summary.json
LOGS = f"results/logs/{PROFILE}"
BENCH = f"results/benchmarks/{PROFILE}"


# ---- GPUs: each training job declares gpu=1; `refilled pin` picks a free GPU slot at run time ----
def _count_gpus():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


N_GPUS = _count_gpus() if P["gpus"] == "auto" else int(P["gpus"])
GPUS = P["gpus"]                       # passed to `refilled pin` (auto: counted on the node that runs the job)
SLOTS = P["gpu_slots_per_gpu"]
if N_GPUS > 0 and "gpu" not in workflow.global_resources:
    # a local run never starts more GPU jobs than slots; `--resources gpu=N` on the command line wins
    workflow.register_resource("gpu", N_GPUS * SLOTS)


wildcard_constraints:
    exp="table1|table2",
    dataset="fashion-mnist|cifar100|cub200",
    h=r"\d+",
    ratio=r"\d+(\.\d+)?",
    arch=r"wrn-\d+-\d+|mobilenet-\d+(\.\d+)?",
    seed=r"\d+",
    khat=r"\d+|inf",
    lam=r"\d+(\.\d+)?",
    variant="refilled|refilled-minus|refilled-emb",
    method="student|rkd|aml",


# ---- path helpers (the rules and the targets below use the same ones) ----
def split_file(exp, ratio, seed):
    e = EXPS[exp]
    return f"data/splits/{e['dataset']}/h{e['classes_per_task']}/r{fmt(ratio)}/seed{seed}.json"


def data_ready(exp):
    return f"{DATA}/{EXPS[exp]['dataset']}.json"


def teacher_dir(exp, seed):
    return f"{RUNS}/teachers/{exp}/seed{seed}"


def student_dir(exp, ratio, arch, seed):
    return f"{RUNS}/students/{exp}/r{fmt(ratio)}/{arch}/seed{seed}"


def stage1_dir(exp, ratio, arch, seed, khat=KHAT):
    return f"{student_dir(exp, ratio, arch, seed)}/stage1_k{k_hat_value(khat)}"


def stage2_dir(exp, ratio, arch, seed, variant, lam=LAM):
    return f"{student_dir(exp, ratio, arch, seed)}/{variant}_lam{fmt(lam)}"


def method_dir(exp, ratio, arch, seed, method):
    """The run behind one cell of Table 1/2 (REFILLED rows: stage 2 at the profile's lambda)."""
    if method in VARIANTS:
        return stage2_dir(exp, ratio, arch, seed, method)
    return f"{student_dir(exp, ratio, arch, seed)}/{method}"


def per_class_arg(n):
    return "" if n is None else f"--per-class {n}"


def common_args(exp, ratio=None, arch=None, seed=None):
    """Flags every training run of this profile shares (numbers only). The runs behind Figure 1
    evaluate after every epoch (its curves); that changes no reported number."""
    f1 = P["figure1"]
    curve = (exp, fmt(float(ratio)) if ratio is not None else None, arch, str(seed)) == \
        (f1["experiment"], fmt(float(f1["ratio"])), f1["arch"], str(f1["seed"]))
    return (f"--data-root {DATA_ROOT} --no-checksum --batch-size {P['batch_size']} --num-workers {P.get('num_workers', 0)} "
            f"--eval-every {1 if curve else P['eval_every']} --device {P['device']} --profile {PROFILE}")


def table_runs(exp):
    return [method_dir(exp, r, a, s, m) for r in EXPS[exp]["ratios"] for m in METHODS
            for a in EXPS[exp]["students"] for s in SEEDS]


def table4_runs():
    t4 = P["table4"]
    return [stage1_dir(t4["experiment"], r, t4["arch"], s, k) for r in t4["ratios"] for k in t4["k_hats"] for s in SEEDS]


def figure1_runs():
    f = P["figure1"]
    return [stage1_dir(f["experiment"], f["ratio"], f["arch"], f["seed"]),
            stage2_dir(f["experiment"], f["ratio"], f["arch"], f["seed"], "refilled")]


def figure2_runs():
    f = P["figure2"]
    return [stage2_dir(f["experiment"], f["ratio"], a, s, "refilled", lam)
            for a in EXPS[f["experiment"]]["students"] for lam in f["lams"] for s in SEEDS]


def figure3_runs():
    f = P["figure3"]
    return [stage2_dir(f["experiment"], r, f["arch"], s, "refilled", f["lam"]) for r in f["ratios"] for s in SEEDS]


def summaries(dirs):
    return [f"{d}/summary.json" for d in dirs]


TABLES = [f"results/table{t}{suffix}" for t in (1, 2, 4) for suffix in (".csv", "_long.csv", ".md")]
FIGURES = [f"figures/{name}.{ext}" for name in ("figure1_convergence", "figure2_lambda_sweep", "figure3_lambda_hist")
           for ext in ("png", "pdf")]


report: "workflow/report/workflow.rst"


include: "workflow/rules/data.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/stage1.smk"
include: "workflow/rules/stage2.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"


localrules: all, data, teachers, students, tables, figures, prepare_data, split, table1, table2, table4, lambda_auc, figure1, figure2, figure3


rule all:
    default_target: True
    input:
        TABLES,
        FIGURES,
        "results/lambda_auc.csv",


# Coarse targets (the stages of dvc.yaml call these).
rule data:
    input:
        sorted({data_ready(e) for e in EXPS}),
        sorted({split_file(e, r, s) for e in EXPS for r in [0, *EXPS[e]["ratios"]] for s in SEEDS}),


rule teachers:
    input:
        [f"{teacher_dir(e, s)}/summary.json" for e in EXPS for s in SEEDS],


rule students:
    input:
        sorted(set(summaries(table_runs("table1") + table_runs("table2") + table4_runs() + figure1_runs()
                             + figure2_runs() + figure3_runs()))),


rule tables:
    input:
        TABLES,


rule figures:
    input:
        FIGURES,
        "results/lambda_auc.csv",
