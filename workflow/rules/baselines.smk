# Stage: baselines. Student (CE only), RKD and AML, from scratch with the stage-2 recipe
# (the CE-only student does not depend on the teacher).


rule baseline:
    input:
        split=lambda wc: split_file(wc.exp, wc.ratio, wc.seed),
        teacher=lambda wc: [] if wc.method == "student" else f"{teacher_dir(wc.exp, wc.seed)}/model.pt",
        data=lambda wc: data_ready(wc.exp),
    output:
        summary=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{method}}/summary.json",
        model=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{method}}/model.pt",
        metrics=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{method}}/metrics.csv",
    log:
        f"{LOGS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{method}}.log",
    benchmark:
        f"{BENCH}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{method}}.tsv"
    params:
        out=lambda wc, output: os.path.dirname(output.summary),
        epochs=lambda wc: EXPS[wc.exp]["stage2_epochs"],
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["per_class"]),
        common=lambda wc: common_args(wc.exp),
        teacher=lambda wc, input: f"--teacher {input.teacher}" if input.teacher else "",
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "{REFILLED} pin --gpus {GPUS} --per-gpu {SLOTS} --threads {threads} -- "
        "train-baseline --split {input.split} --arch {wildcards.arch} --method {wildcards.method} "
        "{params.teacher} --epochs {params.epochs} {params.per_class} --seed {wildcards.seed} "
        "{params.common} --out {params.out} > {log} 2>&1"
