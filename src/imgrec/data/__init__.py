"""Datasets: built-ins (MNIST, Fashion-MNIST, CIFAR-10), folders, CSV files."""

from .datasets import BUILTINS, Dataset, Split, load_dataset

__all__ = ["BUILTINS", "Dataset", "Split", "load_dataset"]
