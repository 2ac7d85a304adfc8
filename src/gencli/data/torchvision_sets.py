"""MNIST, Fashion-MNIST and CIFAR-10 from their standard files, downloaded only when asked.

The files are read by gencli's own small readers, not torchvision's classes, because torchvision
insists on its own folder layout, on uncompressed IDX files and on md5 sums of the full release;
users often hold only the ``.gz`` files or only the 10k test split. torchvision is still what
downloads (``data.download=true``), with its mirrors and checksums.

``data.source_split`` picks which official files feed gencli's train/val split: ``train`` (60k / 50k
images) or ``test`` (the 10k test files alone are enough to train and validate on).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gencli.data.base import ImageDataModule, resize_uint8
from gencli.errors import ConfigError, RuntimeFailure

SOURCE_SPLITS = ("train", "test")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise RuntimeFailure(f"{path} is not an IDX file (bad magic number); replace it with the original download.")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise RuntimeFailure(f"{path} has an unknown IDX data type 0x{raw[2]:02x}.")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise RuntimeFailure(f"{path} is truncated: header says {shape}, file holds {data.size} values.")
    return data.reshape(shape)


class _DownloadableDataModule(ImageDataModule):
    """Shared by the file-backed torchvision data sets: root, download flag and source split."""

    #: torchvision class name, for download and for the folder it creates under root.
    torchvision_class: str = ""
    #: Where to get the files by hand, for the offline error message.
    homepage: str = ""

    def __init__(self, root: str = "data", download: bool = False, source_split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if source_split not in SOURCE_SPLITS:
            raise ConfigError(f"data.source_split={source_split!r} is not known; use train or test.")
        self.root = Path(str(root)).expanduser()
        self.download = bool(download)
        self.source_split = source_split

    def describe(self) -> dict:
        return {**super().describe(), "source_split": self.source_split}

    def required_files(self) -> list[str]:
        raise NotImplementedError

    def search_dirs(self) -> list[Path]:
        raise NotImplementedError

    def find_files(self) -> dict[str, Path] | None:
        """The required files, each found as-is or gzip-compressed, in the first folder that has all."""
        for folder in self.search_dirs():
            found = {}
            for name in self.required_files():
                for candidate in (folder / name, folder / f"{name}.gz"):
                    if candidate.is_file():
                        found[name] = candidate
                        break
            if len(found) == len(self.required_files()):
                return found
        return None

    def locate(self) -> dict[str, Path]:
        found = self.find_files()
        if found is None and self.download:
            self.fetch()
            found = self.find_files()
        if found is None:
            wanted = ", ".join(self.required_files())
            places = " or ".join(str(d) for d in self.search_dirs())
            raise RuntimeFailure(
                f"{self.name} ({self.source_split} split) is not under data.root={self.root}: gencli needs {wanted} "
                f"(each may be .gz compressed) in {places}. Download them from {self.homepage} and put them "
                f"there, point data.root at the folder that holds them, or set data.download=true on a machine "
                f"that is online. To train on the 10k test files alone, add data.source_split=test."
            )
        return found

    def fetch(self) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.torchvision_class)
        try:
            cls(str(self.root), train=self.source_split == "train", download=True)
        except Exception as err:  # URLError, socket errors, checksum failures: all mean "no files"
            raise RuntimeFailure(
                f"downloading {self.name} into data.root={self.root} failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160] if str(err) else 'no message'}). This machine is probably "
                f"offline: put {', '.join(self.required_files())} in {self.search_dirs()[0]} by hand "
                f"(from {self.homepage}) and run with data.download=false."
            ) from err


class MNISTDataModule(_DownloadableDataModule):
    name = "mnist"
    torchvision_class = "MNIST"
    homepage = "https://yann.lecun.com/exdb/mnist/ (or any MNIST mirror)"

    def __init__(self, image_size: int = 32, channels: int = 1, **kwargs):
        super().__init__(image_size=image_size, channels=channels, **kwargs)

    def required_files(self) -> list[str]:
        prefix = "train" if self.source_split == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]

    def search_dirs(self) -> list[Path]:
        return [self.root, self.root / self.torchvision_class / "raw", self.root / "raw"]

    def load_images(self) -> tuple[Tensor, Tensor]:
        images_file, labels_file = self.locate().values()
        images = torch.from_numpy(read_idx(images_file).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        if len(images) != len(labels):
            raise RuntimeFailure(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels.")
        return resize_uint8(images, self.image_size), labels


class FashionMNISTDataModule(MNISTDataModule):
    name = "fashion_mnist"
    torchvision_class = "FashionMNIST"
    homepage = "https://github.com/zalandoresearch/fashion-mnist"


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts of numpy arrays: allow just those classes."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    except Exception as err:
        raise RuntimeFailure(
            f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err}). Replace it with the file "
            "from cifar-10-python.tar.gz."
        ) from err
    return data, labels


class CIFAR10DataModule(_DownloadableDataModule):
    name = "cifar10"
    torchvision_class = "CIFAR10"
    homepage = "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz)"
    folder = "cifar-10-batches-py"

    def __init__(self, image_size: int = 32, channels: int = 3, random_flip: bool = True, **kwargs):
        super().__init__(image_size=image_size, channels=channels, random_flip=random_flip, **kwargs)

    def required_files(self) -> list[str]:
        if self.source_split == "train":
            return [f"data_batch_{i}" for i in range(1, 6)]
        return ["test_batch"]

    def search_dirs(self) -> list[Path]:
        return [self.root / self.folder, self.root]

    def find_files(self) -> dict[str, Path] | None:
        found = super().find_files()
        archive = self.root / "cifar-10-python.tar.gz"
        if found is None and archive.is_file():  # the release as downloaded: unpack it once
            from torchvision.datasets.utils import extract_archive

            extract_archive(str(archive), str(self.root))
            found = super().find_files()
        return found

    def load_images(self) -> tuple[Tensor, Tensor]:
        parts = [read_cifar_batch(p) for p in self.locate().values()]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        return resize_uint8(images, self.image_size), labels
