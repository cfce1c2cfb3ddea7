# Stage: tables. Every number is read from the summary.json files listed as inputs.


rule table1:
    input:
        summaries(table_runs("table1")),
    output:
        csv=report("results/table1.csv", caption="../report/table1.rst", category="Tables"),
        long="results/table1_long.csv",
        md="results/table1.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/table1.log",
    benchmark:
        f"{BENCH}/table1.tsv"
    params:
        lam=LAM,
        **table_rule_params("table1"),
    shell:
        "refilled table --table 1 --summaries {input} --ratios {params.ratios} --columns {params.columns} "
        "--methods {params.methods} --lam {params.lam} --out {output.csv} --long {output.long} --markdown {output.md} > {log} 2>&1"


rule table2:
    input:
        summaries(table_runs("table2")),
    output:
        csv=report("results/table2.csv", caption="../report/table2.rst", category="Tables"),
        long="results/table2_long.csv",
        md="results/table2.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/table2.log",
    benchmark:
        f"{BENCH}/table2.tsv"
    params:
        lam=LAM,
        **table_rule_params("table2"),
    shell:
        "refilled table --table 2 --summaries {input} --ratios {params.ratios} --columns {params.columns} "
        "--methods {params.methods} --lam {params.lam} --out {output.csv} --long {output.long} --markdown {output.md} > {log} 2>&1"


rule table3:
    input:
        runs=summaries(table_runs("table3")),
        teachers=[f"{teacher_dir('table3', s)}/summary.json" for s in SEEDS],
    output:
        csv=report("results/table3.csv", caption="../report/table3.rst", category="Tables"),
        long="results/table3_long.csv",
        md="results/table3.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/table3.log",
    benchmark:
        f"{BENCH}/table3.tsv"
    params:
        **table_rule_params("table3"),
    shell:
        "refilled table --table 3 --summaries {input.runs} --teachers {input.teachers} --ratios {params.ratios} "
        "--columns {params.columns} --methods {params.methods} --out {output.csv} --long {output.long} "
        "--markdown {output.md} > {log} 2>&1"


rule table4:
    input:
        summaries(table4_runs()),
    output:
        csv=report("results/table4.csv", caption="../report/table4.rst", category="Tables"),
        long="results/table4_long.csv",
        md="results/table4.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/table4.log",
    benchmark:
        f"{BENCH}/table4.tsv"
    params:
        ratios=" ".join(fmt(r) for r in P["table4"]["ratios"]),
        columns=" ".join(k_hat_value(k) for k in P["table4"]["k_hats"]),
    shell:
        "refilled table --table 4 --summaries {input} --ratios {params.ratios} --columns {params.columns} "
        "--out {output.csv} --long {output.long} --markdown {output.md} > {log} 2>&1"


rule reproduction:
    input:
        tables=[f"results/table{t}_long.csv" for t, _, _ in reproduction_tables()],
    output:
        csv=report("results/reproduction.csv", caption="../report/reproduction.rst", category="Tables"),
        md="results/reproduction.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/reproduction.log",
    params:
        tables=lambda wc, input: " ".join(f"--table {n} {path} {d} {s}" for path, (n, d, s) in
                                          zip(input.tables, reproduction_tables())),
    shell:
        "refilled reproduction {params.tables} --out {output.csv} --markdown {output.md} > {log} 2>&1"
# Table H (supplement §2): the joint-head runs and the training-free references of the
# table_h section, Acc_C' / Acc_C / H per cell.
rule table_h:
    input:
        summaries(table_h_runs()),
    output:
        csv=report("results/table_h.csv", caption="../report/table_h.rst", category="Tables"),
        long="results/table_h_long.csv",
        md="results/table_h.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/table_h.log",
    benchmark:
        f"{BENCH}/table_h.tsv"
    params:
        grid=" ".join(f"--grid {e} {','.join(fmt(r) for r in ratios)} {','.join(archs)}"
                      for e, ratios, archs in table_h_grid()),
        methods=" ".join(P["table_h"]["methods"]),
    shell:
        "refilled table --table h --summaries {input} {params.grid} --methods {params.methods} "
        "--out {output.csv} --long {output.long} --markdown {output.md} > {log} 2>&1"
