# Stage: every student run of every method in the catalog (src/refilled/methods/catalog.py):
# one run per (experiment, ratio, student, seed, method, swept hyper-parameters). A method
# with a teacher reads the seed's teacher; one that starts from another method (the
# REFILLED rows from stage 1) reads that run's model at the profile's hyper-parameters.


def train_inputs(wc):
    entry = CATALOG[wc.method]
    inputs = {"split": split_file(wc.exp, wc.ratio, wc.seed), "data": data_ready(wc.exp)}
    if entry.teacher:
        inputs["teacher"] = f"{teacher_dir(wc.exp, wc.seed)}/model.pt"
    if entry.starts_from:
        inputs["init"] = f"{run_dir(wc.exp, wc.ratio, wc.arch, wc.seed, entry.starts_from)}/model.pt"
    return inputs


def train_sets(wc):
    """--set for every hyper-parameter the profile or the directory name fixes."""
    values = method_values(P, wc.method, **tag_values(wc.method, wc.tag))
    name = CATALOG[wc.method].run_name(values)
    if name != f"{wc.method}{wc.tag}":   # e.g. lam1.0 for lam1: one spelling per run
        raise WorkflowError(f"run directory {wc.method}{wc.tag} should be spelled {name}")
    hp = CATALOG[wc.method].settable
    return " ".join(f"--set {k}={hp[k].format(v)}" for k, v in values.items() if k in hp)


def train_flags(wc, input):
    return " ".join(f"--{k} {getattr(input, k)}" for k in ("teacher", "init") if hasattr(input, k))


rule train:
    input:
        unpack(train_inputs),
    output:
        **{f.split(".")[0]: f"{RUNS}/{STUDENT_RUN}/{f}" for f in RUN_FILES},
    log:
        f"{LOGS}/{STUDENT_RUN}.log",
    benchmark:
        f"{BENCH}/{STUDENT_RUN}.tsv"
    params:
        refilled=REFILLED,
        gpus=GPUS,
        slots=SLOTS,
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
        "{params.refilled} pin --gpus {params.gpus} --per-gpu {params.slots} --threads {threads} -- "
        "train --method {wildcards.method} --split {input.split} --arch {wildcards.arch} {params.inputs} "
        "{params.sets} --epochs {params.epochs} {params.per_class} --seed {wildcards.seed} {params.common} "
        "--out {params.out} > {log} 2>&1"
