# Stage: every student run of every method in the catalog (src/refilled/methods/catalog.py):
# one run per (experiment, ratio, student, seed, method, swept hyper-parameters). A method
# with a teacher reads the seed's teacher; one that starts from another method (the
# REFILLED rows from stage 1) reads that run's model at the profile's hyper-parameters.


rule train:
    input:
        unpack(train_inputs),
    output:
        **{f.split(".")[0]: f"{RUNS}/{STUDENT_RUN}/{f}" for f in RUN_FILES},
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/{STUDENT_RUN}.log",
    benchmark:
        f"{BENCH}/{STUDENT_RUN}.tsv"
    params:
        out=lambda wc, output: os.path.dirname(output.summary),
        epochs=lambda wc: EXPS[wc.exp][CATALOG[wc.method].epochs],
        per_class=lambda wc: per_class_arg(EXPS[wc.exp]["per_class"]),
        common=lambda wc, output: common_args(wc.exp, os.path.dirname(output.summary)),
        inputs=train_flags,
        sets=train_sets,
    threads: P["threads"]
    resources:
        gpu=1,
    shell:
        "refilled pin $REFILLED_PIN --threads {threads} -- "
        "train --method {wildcards.method} --split {input.split} --arch {wildcards.arch} {params.inputs} "
        "{params.sets} --epochs {params.epochs} {params.per_class} --seed {wildcards.seed} {params.common} "
        "--out {params.out} > {log} 2>&1"
