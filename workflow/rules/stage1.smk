# Stage: REFILLED stage 1 (comparison matching of the student's embedding). One run per
# (experiment, ratio, student, seed, K-hat); the three REFILLED rows share the run at the
# profile's K-hat, Table 4 adds the other K-hat values.


rule stage1:
    input:
        split=lambda wc: split_file(wc.exp, wc.ratio, wc.seed),
        teacher=lambda wc: f"{teacher_dir(wc.exp, wc.seed)}/model.pt",
        data=lambda wc: data_ready(wc.exp),
    output:
        summary=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/stage1_k{{khat}}/summary.json",
        model=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/stage1_k{{khat}}/model.pt",
        metrics=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/stage1_k{{khat}}/metrics.csv",
    log:
        f"{LOGS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/stage1_k{{khat}}.log",
    benchmark:
        f"{BENCH}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/stage1_k{{khat}}.tsv"
    params:
        out=lambda wc, output: os.path.dirname(output.summary),
        epochs=lambda wc: EXPS[wc.exp]["stage1_epochs"],
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["per_class"]),
        common=lambda wc: common_args(wc.exp, wc.ratio, wc.arch, wc.seed),
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "{REFILLED} pin --gpus {GPUS} --per-gpu {SLOTS} --threads {threads} -- "
        "train-stage1 --split {input.split} --arch {wildcards.arch} --teacher {input.teacher} --k-hat {wildcards.khat} "
        "--epochs {params.epochs} {params.per_class} --seed {wildcards.seed} {params.common} --out {params.out} "
        "> {log} 2>&1"
