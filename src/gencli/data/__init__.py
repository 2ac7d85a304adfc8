"""LightningDataModules: every one is an ImageDataModule serving [-1, 1] NCHW batches."""

from gencli.data.base import ImageDataModule
from gencli.data.digits import DigitsDataModule
from gencli.data.folder import FolderDataModule
from gencli.data.torchvision_sets import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "ImageDataModule", "DigitsDataModule", "FolderDataModule",
    "MNISTDataModule", "FashionMNISTDataModule", "CIFAR10DataModule",
]
