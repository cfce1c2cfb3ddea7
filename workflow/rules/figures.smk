# Stage: figures (PNG + PDF), from the run directories listed as inputs.


rule figure1:
    input:
        [f"{d}/{f}" for d in figure1_runs() for f in ("metrics.csv", "summary.json")],
    output:
        png=report("figures/figure1_convergence.png", caption="../report/figure1.rst", category="Figures",
                   subcategory="Figure 1"),
        pdf="figures/figure1_convergence.pdf",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figure1.log",
    benchmark:
        f"{BENCH}/figure1.tsv"
    params:
        runs=figure1_runs(),
    shell:
        "refilled figure --figure 1 --runs {params.runs} --out figures/figure1_convergence > {log} 2>&1"


rule figure2:
    input:
        summaries(figure2_runs()),
    output:
        png=report("figures/figure2_lambda_sweep.png", caption="../report/figure2.rst", category="Figures",
                   subcategory="Figure 2"),
        pdf="figures/figure2_lambda_sweep.pdf",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figure2.log",
    benchmark:
        f"{BENCH}/figure2.tsv"
    params:
        runs=figure2_runs(),
    shell:
        "refilled figure --figure 2 --runs {params.runs} --out figures/figure2_lambda_sweep > {log} 2>&1"


rule figure3:
    input:
        summaries(figure3_runs()),   # lambda_i.csv is written before each summary.json
    output:
        png=report("figures/figure3_lambda_hist.png", caption="../report/figure3.rst", category="Figures",
                   subcategory="Figure 3"),
        pdf="figures/figure3_lambda_hist.pdf",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/figure3.log",
    benchmark:
        f"{BENCH}/figure3.tsv"
    params:
        runs=figure3_runs(),
    shell:
        "refilled figure --figure 3 --runs {params.runs} --out figures/figure3_lambda_hist > {log} 2>&1"
