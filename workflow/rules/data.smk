# Stage: data. Obtain Fashion-MNIST when data/raw has none of its files (what
# scripts/get_fashion_mnist.sh does: Debian's dataset-fashion-mnist where root, else
# torchvision's download; an error naming both ways when neither works). Then verify the
# raw dataset (checksums where known) and lay out the data root this profile's runs read:
# a link to data/raw/<dataset>, or a seeded per-class subsample (Fashion-MNIST, profiles
# smoke/demo). CIFAR-100 and CUB are never fetched here: the job fails with the path and
# how to obtain them.


rule fetch_fashion_mnist:
    output:
        f"{DATA}/fetched/fashion-mnist.log",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/fetch_fashion_mnist.log",
    params:
        script=f"{BASE}/scripts/get_fashion_mnist.sh",
        refilled=REFILLED,
    shell:
        "REFILLED={params.refilled} bash {params.script} data/raw > {log} 2>&1 && cp {log} {output}"


rule prepare_data:
    input:
        raw_data_inputs,
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
