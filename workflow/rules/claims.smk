# Stage: claims. The supplement's claims tested over seeds (results/claims.{csv,md}, by the
# rules of refilled.report.claims) and the gain-vs-data sweep (profile key gain_vs_data; its points
# are the experiments gain_n<N>, or the base experiment's own runs at its per_class: see
# refilled.experiments.profile.gain_points; all trained by the ordinary train rule). `snakemake claims`.


rule teacher_ncm:
    input:
        split=lambda wc: split_file(wc.exp, wc.ratio, wc.seed),
        teacher=lambda wc: f"{teacher_dir(wc.exp, wc.seed)}/model.pt",
        data=lambda wc: data_ready(wc.exp),
    output:
        f"{RUNS}/teacher_ncm/{{exp}}/r{{ratio}}/seed{{seed}}.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/teacher_ncm/{{exp}}/r{{ratio}}/seed{{seed}}.log",
    params:
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["per_class"]),
        data_root=DATA_ROOT,
        device=P["device"],
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "refilled pin $REFILLED_PIN --threads {threads} -- "
        "ncm --split {input.split} --task student --model {input.teacher} --data-root {params.data_root} --no-checksum "
        "{params.per_class} --seed {wildcards.seed} --device {params.device} --out {output} > {log} 2>&1"


rule gain_vs_data:
    input:
        runs=summaries(gain_runs()),
        ncm=teacher_ncm_files(),
    output:
        csv=report(GAIN_OUTPUTS[0], caption="../report/gain_vs_data.rst", category="Claims"),
        png=report(GAIN_OUTPUTS[1], caption="../report/gain_vs_data.rst", category="Claims"),
        pdf=GAIN_OUTPUTS[2],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/gain_vs_data.log",
    params:
        reference=lambda wc: P["gain_vs_data"]["methods"][0],
    shell:
        "refilled gain-vs-data --summaries {input.runs} --teacher-ncm {input.ncm} "
        "--reference {params.reference} --out {output.csv} --figure figures/gain_vs_data > {log} 2>&1"


rule claims_verdicts:
    input:
        unpack(claims_inputs),
    output:
        csv=report("results/claims.csv", caption="../report/claims.rst", category="Claims"),
        md="results/claims.md",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/claims.log",
    params:
        tables=lambda wc, input: " ".join(f"--table {t[-1]} {path}" for t, path in
                                          zip(P["claims"]["tables"], input.tables)),
        auc_ratio=lambda wc: fmt(P["claims"]["auc_ratio"]),
        note=f"Profile {PROFILE}, seeds {', '.join(map(str, SEEDS))}.",
    shell:
        "refilled claims {params.tables} --table4 {input.table4} --lambda-auc {input.auc} "
        "--auc-ratio {params.auc_ratio} --lambda-sweep {input.sweep} --note '{params.note}' "
        "--out {output.csv} --markdown {output.md} > {log} 2>&1"


rule claims:
    input:
        "results/claims.csv",
        "results/claims.md",
        "results/claims_metrics.json",   # dvc metrics show (workflow/rules/results.smk)
        GAIN_OUTPUTS if P.get("gain_vs_data") else [],
