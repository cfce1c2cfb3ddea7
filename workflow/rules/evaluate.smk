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
        runs=figure3_runs(),
    shell:
        "refilled lambda-auc --runs {params.runs} --out {output} > {log} 2>&1"


# Table H's training-free reference, per (experiment, ratio, student, seed): the teacher's head
# over C' and the plain Student run's head over C, each softmaxed and concatenated, scored on
# the balanced test set of C' ∪ C drawn with the seed (the one the joint-head runs use).
rule joint_reference:
    input:
        split=lambda wc: split_file(wc.exp, wc.ratio, wc.seed),
        data=lambda wc: data_ready(wc.exp),
        teacher=lambda wc: f"{teacher_dir(wc.exp, wc.seed)}/model.pt",
        student=lambda wc: f"{run_dir(wc.exp, wc.ratio, wc.arch, wc.seed, 'student')}/model.pt",
    output:
        f"{RUNS}/{REFERENCE_RUN}/summary.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/{REFERENCE_RUN}.log",
    benchmark:
        f"{BENCH}/{REFERENCE_RUN}.tsv"
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
        test_per_class=lambda wc: ("" if P["table_h"]["test_per_class"] is None
                                   else f"--joint-test-per-class {P['table_h']['test_per_class']}"),
        device=P["device"],
        data_root=DATA_ROOT,
        profile=PROFILE,
    shell:
        "refilled joint-reference --split {input.split} --teacher {input.teacher} --student {input.student} "
        "--seed {wildcards.seed} {params.test_per_class} --data-root {params.data_root} --no-checksum "
        "--device {params.device} --profile {params.profile} --out {params.out} > {log} 2>&1"
