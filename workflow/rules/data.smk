# Stage: data. Verify the raw dataset (checksums where known) and lay out the data root
# this profile's runs read: a link to data/raw/<dataset>, or a seeded per-class subsample
# (Fashion-MNIST, profiles smoke/demo). The rule has no file inputs, so a dry run needs no
# data; the job itself fails with the path and the problem when data/raw is missing or bad.


rule prepare_data:
    output:
        f"{DATA}/{{dataset}}.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/prepare_data/{{dataset}}.log",
    benchmark:
        f"{BENCH}/prepare_data/{{dataset}}.tsv"
    params:
        refilled=REFILLED,
        out=lambda wc, output: os.path.dirname(output[0]),
        test=lambda wc: P["test_per_class"] or "all",
        train=lambda wc: P["train_per_class"] or "all",
    shell:
        "{params.refilled} prepare-data --dataset {wildcards.dataset} --root data/raw --out {params.out} "
        "--test-per-class {params.test} --train-per-class {params.train} --seed 0 > {log} 2>&1"
