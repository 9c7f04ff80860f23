"""Datasets and federated partitions: in-memory torchvision datamodules and client partitioners."""

from fedgen.data.datamodules import (
    COMMON_DATASETS,
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    VisionDataModule,
    dataset_to_tensors,
    load_vision_dataset,
    same_source,
    vision_dataset_class,
)
from fedgen.data.partition import DirichletPartitioner, IIDPartitioner, Partitioner, ShardPartitioner
from fedgen.data.root import DATA_ROOT_ENV, default_cache_root, resolve_data_root

__all__ = [
    "COMMON_DATASETS",
    "CIFAR10DataModule",
    "DATA_ROOT_ENV",
    "DirichletPartitioner",
    "FashionMNISTDataModule",
    "IIDPartitioner",
    "MNISTDataModule",
    "Partitioner",
    "ShardPartitioner",
    "VisionDataModule",
    "dataset_to_tensors",
    "default_cache_root",
    "load_vision_dataset",
    "resolve_data_root",
    "same_source",
    "vision_dataset_class",
]
