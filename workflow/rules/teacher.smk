# Stage: teacher. One teacher per (experiment, seed), trained on the teacher classes; it
# serves every overlap ratio of that seed.


rule teacher:
    input:
        split=lambda wc: split_file(wc.exp, 0, wc.seed),
        data=lambda wc: data_ready(wc.exp),
    output:
        summary=f"{RUNS}/teachers/{{exp}}/seed{{seed}}/summary.json",
        model=f"{RUNS}/teachers/{{exp}}/seed{{seed}}/model.pt",
        metrics=f"{RUNS}/teachers/{{exp}}/seed{{seed}}/metrics.csv",
    log:
        f"{LOGS}/teachers/{{exp}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/teachers/{{exp}}/seed{{seed}}.tsv"
    params:
        out=lambda wc, output: os.path.dirname(output.summary),
        arch=lambda wc: EXPS[wc.exp]["teacher"]["arch"],
        epochs=lambda wc: EXPS[wc.exp]["teacher"]["epochs"],
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["teacher"]["per_class"]),
        common=lambda wc: common_args(wc.exp),
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "{REFILLED} pin --gpus {GPUS} --per-gpu {SLOTS} --threads {threads} -- "
        "train-teacher --split {input.split} --arch {params.arch} --epochs {params.epochs} {params.per_class} "
        "--seed {wildcards.seed} {params.common} --out {params.out} > {log} 2>&1"
