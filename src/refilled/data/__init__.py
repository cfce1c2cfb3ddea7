"""Datasets of the REFILLED experiments: loading, obtaining and verifying them."""

from refilled.data.check import OFFICIAL_COUNTS, check_dataset, format_summary
from refilled.data.datasets import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_SHA256,
    FASHION_MNIST_STD,
    HOW_TO_OBTAIN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArraySplit,
    DataError,
    Dataset,
    FileImageDataset,
    FileSplit,
    cub_transforms,
    dataset_dir,
    decode_image,
    load_dataset,
    obtain_fashion_mnist,
)

__all__ = [
    "DATASETS", "DataError", "ArraySplit", "FileSplit", "Dataset",
    "load_dataset", "dataset_dir", "obtain_fashion_mnist",
    "FileImageDataset", "cub_transforms", "decode_image",
    "check_dataset", "format_summary", "OFFICIAL_COUNTS", "HOW_TO_OBTAIN",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_SHA256", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]
