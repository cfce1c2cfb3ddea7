# Stage: REFILLED stage 2 (local classifier distillation) from the stage-1 student at the
# profile's K-hat: REFILLED (adaptive lambda_i), REFILLED- (constant lambda) and
# REFILLED^EMB (lambda = 0), at any lambda (the tables use the profile's, Figure 2 sweeps it).


rule stage2:
    input:
        split=lambda wc: split_file(wc.exp, wc.ratio, wc.seed),
        teacher=lambda wc: f"{teacher_dir(wc.exp, wc.seed)}/model.pt",
        init=lambda wc: f"{stage1_dir(wc.exp, wc.ratio, wc.arch, wc.seed)}/model.pt",
        data=lambda wc: data_ready(wc.exp),
    output:
        summary=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{variant}}_lam{{lam}}/summary.json",
        model=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{variant}}_lam{{lam}}/model.pt",
        metrics=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{variant}}_lam{{lam}}/metrics.csv",
        lambda_i=f"{RUNS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{variant}}_lam{{lam}}/lambda_i.csv",
    log:
        f"{LOGS}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{variant}}_lam{{lam}}.log",
    benchmark:
        f"{BENCH}/students/{{exp}}/r{{ratio}}/{{arch}}/seed{{seed}}/{{variant}}_lam{{lam}}.tsv"
    params:
        out=lambda wc, output: os.path.dirname(output.summary),
        epochs=lambda wc: EXPS[wc.exp]["stage2_epochs"],
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["per_class"]),
        common=lambda wc: common_args(wc.exp, wc.ratio, wc.arch, wc.seed),
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "{REFILLED} pin --gpus {GPUS} --per-gpu {SLOTS} --threads {threads} -- "
        "train-stage2 --split {input.split} --arch {wildcards.arch} --teacher {input.teacher} --init {input.init} "
        "--variant {wildcards.variant} --lam {wildcards.lam} --epochs {params.epochs} {params.per_class} "
        "--seed {wildcards.seed} {params.common} --out {params.out} > {log} 2>&1"
