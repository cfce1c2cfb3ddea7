# Stage: per-run evaluation beyond what each run's summary.json already holds (final test
# accuracy, NCM accuracy): the AUC of lambda_i separating seen from unseen classes, for
# the REFILLED runs of Figure 3.


rule lambda_auc:
    input:
        # each run's lambda_i.csv is written before its summary.json (the method's finish)
        summaries=summaries(figure3_runs()),
    output:
        report("results/lambda_auc.csv", caption="../report/lambda_auc.rst", category="Figures",
               subcategory="Figure 3"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/lambda_auc.log",
    benchmark:
        f"{BENCH}/lambda_auc.tsv"
    params:
        refilled=REFILLED,
        runs=figure3_runs(),
    shell:
        "{params.refilled} lambda-auc --runs {params.runs} --out {output} > {log} 2>&1"
