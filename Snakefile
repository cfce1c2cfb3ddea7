# The REFILLED workflow: every table and figure of the supplement from one command.
#
#   snakemake --cores 8 results/table2.csv                 # default profile (params.yaml: demo)
#   snakemake --cores 8 all --config profile=paper         # another profile from config/
#   snakemake --report report.html                         # tables and figures on one page
#
# This file is thin: the configuration, paths and helpers live in workflow/rules/common.smk,
# one .smk per stage beside it. Every rule runs one `refilled` command; nothing here imports
# torch. See docs/workflow.md.

configfile: f"{workflow.basedir}/params.yaml"


include: "workflow/rules/common.smk"


shell.prefix(SHELL_PREFIX)


onstart:
    if USE_FORKSERVER:
        forkserver.start(threads=P["threads"])


onsuccess:
    forkserver.stop()


onerror:
    forkserver.stop()


wildcard_constraints:
    exp="|".join(EXPS),
    dataset="fashion-mnist|cifar100|cub200",
    h=r"\d+",
    ratio=r"\d+(\.\d+)?",
    arch=ARCH_PATTERN,
    seed=r"\d+",
    order="seeded|authors",
    method="|".join(re.escape(m) for m in sorted(CATALOG, key=len, reverse=True)),
    tag=r"(_[a-z]+[A-Za-z0-9.]*)*",
    joint=r"(-joint)?",


report: "workflow/report/workflow.rst"


include: "workflow/rules/data.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/claims.smk"
include: "workflow/rules/results.smk"


localrules:
    all,
    data,
    teachers,
    students,
    tables,
    figures,
    prepare_data,
    split,
    table1,
    table2,
    table3,
    table4,
    reproduction,
    table_h,
    lambda_auc,
    figure1,
    figure2,
    figure3,
    gain_vs_data,
    claims_verdicts,
    claims,
    metrics_json,
    claims_metrics,
    figure1_data,
    figure2_data,
    metrics,


rule all:
    default_target: True
    input:
        TABLES,
        FIGURES,
        "results/lambda_auc.csv",
        "results/metrics.json",
        PLOT_DATA,


# Coarse targets (the stages of dvc.yaml call these).
rule data:
    input:
        sorted({data_ready(e) for e in EXPS}),
        sorted({split_file(e, r, s) for e in EXPS for r in {teacher_ratio(e), *EXPS[e]["ratios"]} for s in SEEDS}),


rule teachers:
    input:
        sorted({f"{teacher_dir(e, s)}/summary.json" for e in EXPS for s in SEEDS}),


rule students:
    input:
        sorted(set(summaries([d for e in EXPS for d in table_runs(e)] + table4_runs() + figure1_runs()
                             + figure2_runs() + figure3_runs() + table_h_runs()))),


rule tables:
    input:
        TABLES,


rule figures:
    input:
        FIGURES,
        "results/lambda_auc.csv",


# what dvc metrics / dvc plots read (after tables and figures)
rule metrics:
    input:
        "results/metrics.json",
        PLOT_DATA,
