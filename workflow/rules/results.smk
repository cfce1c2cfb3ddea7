# Stage: metrics. What `dvc metrics` and `dvc plots` read (dvc.yaml): results/metrics.json from
# the tables' long CSVs and lambda_auc.csv; Figure 1's and Figure 2's curves as CSVs at fixed
# paths (dvc.yaml names files statically). The claims' verdicts go to a file of their own,
# results/claims_metrics.json, made by the claims target: `all` does not depend on the claims.

METRICS_TABLES = [("1", "results/table1_long.csv"), ("2", "results/table2_long.csv"),
                  ("3", "results/table3_long.csv"), ("4", "results/table4_long.csv"),
                  ("h", "results/table_h_long.csv")]
PLOT_DATA = ["results/plots/figure1_stage1.csv", "results/plots/figure1_stage2.csv",
             "results/plots/figure2_lambda_sweep.csv"]


rule metrics_json:
    input:
        tables=[path for _, path in METRICS_TABLES],
        auc="results/lambda_auc.csv",
    output:
        "results/metrics.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics.log",
    params:
        profile=PROFILE,
        tables=" ".join(f"--table {t} {path}" for t, path in METRICS_TABLES),
    shell:
        "refilled metrics --profile {params.profile} {params.tables} --lambda-auc {input.auc} "
        "--out {output} > {log} 2>&1"


rule figure1_data:
    input:
        [f"{d}/metrics.csv" for d in figure1_runs()],
    output:
        stage1=PLOT_DATA[0],
        stage2=PLOT_DATA[1],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figure1_data.log",
    params:
        runs=figure1_runs(),
    shell:
        "refilled plot-data --figure 1 --runs {params.runs} --out {output.stage1} {output.stage2} > {log} 2>&1"


rule figure2_data:
    input:
        summaries(figure2_runs()),
    output:
        PLOT_DATA[2],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figure2_data.log",
    params:
        runs=figure2_runs(),
    shell:
        "refilled plot-data --figure 2 --runs {params.runs} --out {output} > {log} 2>&1"


rule claims_metrics:
    input:
        "results/claims.csv",
    output:
        "results/claims_metrics.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/claims_metrics.log",
    params:
        profile=PROFILE,
    shell:
        "refilled metrics --profile {params.profile} --claims {input} --out {output} > {log} 2>&1"
