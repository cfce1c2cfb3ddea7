# Stage: splits. Teacher and student classes for one (dataset, h, ratio, seed); ratio 0
# is the teacher's split (the teacher classes do not depend on the ratio).


rule split:
    output:
        "data/splits/{dataset}/h{h}/r{ratio}/seed{seed}.json",
    log:
        "results/logs/splits/{dataset}/h{h}/r{ratio}/seed{seed}.log",
    benchmark:
        "results/benchmarks/splits/{dataset}/h{h}/r{ratio}/seed{seed}.tsv"
    params:
        refilled=REFILLED,
    shell:
        "{params.refilled} split --dataset {wildcards.dataset} --ratio {wildcards.ratio} --seed {wildcards.seed} "
        "--classes-per-task {wildcards.h} --out {output} > {log} 2>&1"
