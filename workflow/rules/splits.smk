# Stage: splits. Teacher and student classes for one (dataset, class order, h, ratio, seed);
# ratio 0 is the teacher's split (the teacher classes do not depend on the ratio). Class
# order: seeded (a permutation per seed) or the authors' fixed one (CIFAR-100, CUB).


rule split:
    output:
        "data/splits/{dataset}/{order}/h{h}/r{ratio}/seed{seed}.json",
    conda:
        CONDA_ENV
    log:
        "results/logs/splits/{dataset}/{order}/h{h}/r{ratio}/seed{seed}.log",
    benchmark:
        "results/benchmarks/splits/{dataset}/{order}/h{h}/r{ratio}/seed{seed}.tsv"
    shell:
        "refilled split --dataset {wildcards.dataset} --ratio {wildcards.ratio} --seed {wildcards.seed} "
        "--class-order {wildcards.order} "
        "--classes-per-task {wildcards.h} --out {output} > {log} 2>&1"
