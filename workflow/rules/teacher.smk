# Stage: teacher. One teacher per (experiment, seed), trained on the teacher classes; it
# serves every overlap ratio of that seed (its split: teacher_ratio in common.smk).


rule teacher:
    input:
        split=lambda wc: split_file(wc.exp, teacher_ratio(wc.exp), wc.seed),
        data=lambda wc: data_ready(wc.exp),
    output:
        **{f.split(".")[0]: f"{RUNS}/{TEACHER_RUN}/{f}" for f in RUN_FILES},
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/{TEACHER_RUN}.log",
    benchmark:
        f"{BENCH}/{TEACHER_RUN}.tsv"
    params:
        method=TEACHER_METHOD,
        out=lambda wc, output: os.path.dirname(output.summary),
        arch=lambda wc: EXPS[wc.exp]["teacher"]["arch"],
        epochs=lambda wc: EXPS[wc.exp]["teacher"]["epochs"],
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["teacher"]["per_class"]),
        common=lambda wc: common_args(wc.exp, recipe=EXPS[wc.exp]["teacher"]),
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "refilled pin $REFILLED_PIN --threads {threads} -- "
        "train --method {params.method} --task teacher --split {input.split} --arch {params.arch} --epochs {params.epochs} {params.per_class} "
        "--seed {wildcards.seed} {params.common} --out {params.out} > {log} 2>&1"
