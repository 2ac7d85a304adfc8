"""Data modules: real file formats, deterministic splits, the folder loader, offline errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from gencli.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    FolderDataModule,
    MNISTDataModule,
)
from gencli.data.base import resize_uint8
from gencli.errors import ConfigError, RuntimeFailure


def test_digits_shape_range_and_deterministic_split():
    a, b = DigitsDataModule(image_size=16, seed=3), DigitsDataModule(image_size=16, seed=3)
    a.setup(), b.setup()
    x, y = a.train_set[0]
    assert x.shape == (1, 16, 16) and x.min() >= -1 and x.max() <= 1 and 0 <= int(y) <= 9
    assert len(a.train_set) + len(a.val_set) == 1797
    assert torch.equal(a.val_set.images, b.val_set.images)
    c = DigitsDataModule(image_size=16, seed=4)
    c.setup()
    assert not torch.equal(a.val_set.images, c.val_set.images)
    batch = next(iter(a.train_dataloader()))
    assert batch[0].shape == (64, 1, 16, 16)


@pytest.mark.parametrize("split,n", [("train", 96), ("test", 48)])
@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_mnist_reads_idx_files_gz_or_raw(mnist_root, cls, split, n):
    dm = cls(root=str(mnist_root), source_split=split, image_size=16, val_fraction=0.25)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == n
    assert dm.train_set.images.shape[1:] == (1, 16, 16)
    assert set(dm.train_set.labels.tolist()) <= set(range(10))


def test_mnist_in_torchvision_layout(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in mnist_root.iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    dm = MNISTDataModule(root=str(tmp_path), source_split="test")
    dm.setup()
    assert dm.image_shape == (1, 32, 32)


def test_missing_mnist_offline_names_the_files(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeFailure) as err:
        dm.setup()
    message = str(err.value)
    for needed in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", str(tmp_path / "nowhere"),
                   "data.download=true", "data.source_split=test"):
        assert needed in message


def test_failed_download_is_a_clear_runtime_failure(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.raises(RuntimeFailure, match=r"downloading mnist .* failed \(URLError.*offline"):
        dm.setup()


@pytest.mark.parametrize("split,n", [("train", 80), ("test", 16)])
def test_cifar10_reads_python_batches(cifar_root, split, n):
    dm = CIFAR10DataModule(root=str(cifar_root), source_split=split, val_fraction=0.25)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == n
    assert dm.train_set.images.shape[1:] == (3, 32, 32)
    assert dm.train_set.random_flip and not dm.val_set.random_flip


def test_cifar10_batch_refuses_foreign_pickles(tmp_path):
    import os
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(RuntimeFailure, match="refusing to load"):
        CIFAR10DataModule(root=str(tmp_path), source_split="test").setup()


def test_folder_loader_labels_resizes_and_skips_corrupt_files(image_folder):
    # the eager loader counts unreadable files at set-up (the lazy one meets them later: test_folder_lazy.py)
    dm = FolderDataModule(root=str(image_folder), image_size=16, channels=3, val_fraction=0.25, lazy=False)
    with pytest.warns(UserWarning, match=r"skipped 1 of 25 file\(s\)"):
        dm.setup()
    assert dm.class_names == ["cats", "dogs"]
    assert len(dm.train_set) + len(dm.val_set) == 24
    assert dm.train_set.images.shape[1:] == (3, 16, 16)
    gray = FolderDataModule(root=str(image_folder), image_size=8, channels=1, resize="resize", lazy=False)
    with pytest.warns(UserWarning):
        gray.setup()
    assert gray.train_set.images.shape[1:] == (1, 8, 8)


def test_folder_loader_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        FolderDataModule(root=str(tmp_path / "missing")).setup()
    with pytest.raises(ConfigError, match="holds no images"):
        FolderDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ConfigError, match="resize"):
        FolderDataModule(root=str(tmp_path), resize="squash")


def test_center_crop_keeps_the_middle():
    images = torch.zeros(1, 1, 8, 16, dtype=torch.uint8)
    images[..., 4:12] = 255  # a bright centre square between dark side bands
    out = resize_uint8(images, 8, "center_crop")
    assert out.shape == (1, 1, 8, 8) and out.float().mean() > 250


def test_bad_data_values_are_config_errors():
    with pytest.raises(ConfigError, match="data.channels=2"):
        DigitsDataModule(channels=2)
    with pytest.raises(ConfigError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ConfigError, match="source_split"):
        MNISTDataModule(source_split="validation")


def test_real_mnist_test_split(shared_mnist):
    dm = MNISTDataModule(root=str(shared_mnist), source_split="test", image_size=28)
    dm.setup()
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert len(labels) == 10_000
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean = torch.cat([dm.train_set.images, dm.val_set.images]).float().mean()
    assert abs(mean - 33.79) < 0.05


def test_batched_fetch_gives_the_pixels_of_per_image_fetch():
    """The training loader fetches a batch at once (__getitems__): same images, labels and flips as one by one."""
    from gencli.data.base import EpochSampler, UInt8ImageDataset

    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    dataset = UInt8ImageDataset(images, torch.arange(40), random_flip=True)
    items = list(EpochSampler(dataset, seed=3, random_flip=True))[:16]
    assert any(flip for _, flip in items) and not all(flip for _, flip in items)
    x, y = dataset.__getitems__(items)
    one_by_one = [dataset[item] for item in items]
    assert torch.equal(x, torch.stack([xi for xi, _ in one_by_one]))
    assert torch.equal(y, torch.stack([yi for _, yi in one_by_one]))
    loader = DigitsDataModule(image_size=8, batch_size=16, seed=3, random_flip=True).train_dataloader()
    batch_x, batch_y = next(iter(loader))
    assert batch_x.shape == (16, 1, 8, 8) and batch_x.dtype == torch.float32 and batch_y.shape == (16,)
