# Stage: data. For Fashion-MNIST, first obtain its four official files when data/raw has none
# (scripts/get_fashion_mnist.sh: Debian's dataset-fashion-mnist where root, else torchvision's
# download; an error naming both ways when neither works).
# Then verify the raw dataset (checksums where known) and lay out the data root this
# profile's runs read: a link to data/raw/<dataset>, or a seeded per-class subsample
# (Fashion-MNIST, profiles smoke/demo). CIFAR-100 and CUB are never fetched here: the job
# fails with the path and how to obtain them.
#
# The rule has no input files on purpose. Its inputs would otherwise depend on what lies in
# data/raw when the DAG is built (the files, or a fetch step while they are missing), and
# Snakemake's input trigger would rerun this rule, and every run of the profile after it,
# on the first invocation after the data arrived. The raw files are checksum-verified
# (Fashion-MNIST, CIFAR-100) or fixed by their official layout (CUB), so they are not
# something to edit and propagate; to redo a profile's data, delete data/prepared/<profile>.


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
        out=lambda wc, output: os.path.dirname(output[0]),
        test=lambda wc: P["test_per_class"] or "all",
        train=lambda wc: P["train_per_class"] or "all",
    shell:
        "( [ {wildcards.dataset} != fashion-mnist ] || ls data/raw/fashion-mnist/*-ubyte* > /dev/null 2>&1 "
        "|| REFILLED=refilled bash \"$REFILLED_REPO/scripts/get_fashion_mnist.sh\" data/raw ) > {log} 2>&1 && "
        "refilled prepare-data --dataset {wildcards.dataset} --root data/raw --out {params.out} "
        "--test-per-class {params.test} --train-per-class {params.train} --seed 0 >> {log} 2>&1"
