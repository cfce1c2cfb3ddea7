"""Datasets of the REFILLED experiments: loading, obtaining and verifying them.

The names below are loaded on first use (PEP 562), so that importing a torch-free submodule
such as `refilled.data.splits` (the `split` command, the Snakefile) does not import torch.
"""

from refilled import lazy_names

_WHERE = {
    **dict.fromkeys(("OFFICIAL_COUNTS", "check_dataset", "format_summary"), "refilled.data.check"),
    "DataError": "refilled.data.errors",
    **dict.fromkeys(("DATASETS", "HOW_TO_OBTAIN", "ArraySplit", "Dataset", "FileSplit", "dataset_dir"),
                    "refilled.data.datasets"),
    **dict.fromkeys(("FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_SHA256", "FASHION_MNIST_STD",
                     "obtain_fashion_mnist"), "refilled.data.fashion_mnist"),
    **dict.fromkeys(("CIFAR100_MEAN", "CIFAR100_STD"), "refilled.data.cifar100"),
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "FileImageDataset", "cub_transforms", "decode_image"),
                    "refilled.data.cub200"),
    "load_dataset": "refilled.data.loading",
}

__all__ = [
    "DATASETS", "DataError", "ArraySplit", "FileSplit", "Dataset",
    "load_dataset", "dataset_dir", "obtain_fashion_mnist",
    "FileImageDataset", "cub_transforms", "decode_image",
    "check_dataset", "format_summary", "OFFICIAL_COUNTS", "HOW_TO_OBTAIN",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_SHA256", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE)
