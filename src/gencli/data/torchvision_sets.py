"""MNIST, Fashion-MNIST and CIFAR-10 from their standard files, downloaded only when asked.

The files are read by gencli's own small readers, not torchvision's classes, because torchvision
insists on its own folder layout, on uncompressed IDX files and on md5 sums of the full release;
users often hold only the ``.gz`` files or only the 10k test split. torchvision is still what
downloads (``data.download=true``), with its mirrors and checksums.

``data.source_split`` picks which official files feed gencli's train/val split: ``train`` (60k / 50k
images) or ``test`` (the 10k test files alone are enough to train and validate on).

Downloading and unpacking ``cifar-10-python.tar.gz`` happen in ``prepare_data()``, which Lightning
calls once per node before ``setup()`` runs on every rank; ``setup()`` only reads. Without a Trainer
(``gencli sample`` / ``gencli eval`` use the data module directly) ``setup()`` calls
``prepare_data()`` itself. Every file is checked as it is read: a truncated or corrupt file is a
RuntimeFailure that names it, never a traceback from numpy or pickle, nor a silently wrong data set.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gencli.data.base import ImageDataModule, resize_uint8
from gencli.errors import ConfigError, RuntimeFailure

log = logging.getLogger(__name__)

SOURCE_SPLITS = ("train", "test")
NUM_CLASSES = 10  # MNIST, Fashion-MNIST and CIFAR-10 alike
REPLACE = "replace it with the original download"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:  # OSError covers gzip.BadGzipFile
            raise RuntimeFailure(
                f"{path} is a truncated or corrupt gzip file ({type(err).__name__}: {err}), e.g. from an "
                f"interrupted download; {REPLACE}."
            ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise RuntimeFailure(f"{path} is not an IDX file (bad magic number); {REPLACE}.")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise RuntimeFailure(f"{path} has an unknown IDX data type 0x{raw[2]:02x}; {REPLACE}.")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise RuntimeFailure(f"{path} is truncated inside its header ({len(raw)} bytes); {REPLACE}.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count, itemsize = math.prod(shape), np.dtype(dtype).itemsize  # exact: a corrupt header may overflow int64
    held = (len(raw) - header) // itemsize
    if held != count or (len(raw) - header) % itemsize:
        state = "truncated" if held < count else "longer than its header says"
        raise RuntimeFailure(f"{path} is {state}: its header says {shape} ({count} values), the file holds {held}; "
                             f"{REPLACE}.")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def check_labels(labels: np.ndarray, path: Path, what: str) -> None:
    """Labels must be class indices 0..9: anything else means a damaged or foreign file."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise RuntimeFailure(f"{path} holds {what} of shape {labels.shape} and type {labels.dtype}, not a list of "
                             f"integer class labels; {REPLACE}.")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise RuntimeFailure(f"{path} holds {what} from {int(labels.min())} to {int(labels.max())}, outside the classes "
                             f"0..{NUM_CLASSES - 1}; {REPLACE}.")


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

    def prepare_data(self) -> None:
        """Download the files when ``data.download=true`` and they are missing. Lightning calls this once per
        node (local rank 0) before ``setup()`` on every rank, so ranks never download over each other."""
        if self.find_files() is None and self.download:
            self.fetch()

    def setup(self, stage: str | None = None) -> None:
        # Without a Trainer (gencli sample / eval call split() or setup() directly) nobody has called
        # prepare_data(): do it here, so those paths still download and unpack.
        if self.train_set is None and getattr(self, "trainer", None) is None:
            self.prepare_data()
        super().setup(stage)

    def locate(self) -> dict[str, Path]:
        """The required files, read-only: prepare_data() has downloaded or unpacked whatever it could."""
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
    class_names = [str(d) for d in range(10)]
    homepage = "https://yann.lecun.com/exdb/mnist/ (or any MNIST mirror)"

    def __init__(self, image_size: int = 32, channels: int = 1, batch_size: int = 128, **kwargs):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, **kwargs)

    def required_files(self) -> list[str]:
        prefix = "train" if self.source_split == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]

    def search_dirs(self) -> list[Path]:
        return [self.root, self.root / self.torchvision_class / "raw", self.root / "raw"]

    def load_images(self) -> tuple[Tensor, Tensor]:
        images_file, labels_file = self.locate().values()
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise RuntimeFailure(f"{images_file} holds an array of shape {images.shape} and type {images.dtype}, not "
                                 f"uint8 images (N x H x W); {REPLACE}.")
        check_labels(labels, labels_file, "labels")
        if len(images) != len(labels):
            raise RuntimeFailure(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels: one "
                                 f"of them is damaged or from another release; {REPLACE}.")
        images = torch.from_numpy(images.copy()).unsqueeze(1)
        return resize_uint8(images, self.image_size), torch.from_numpy(labels.astype(np.int64))


class FashionMNISTDataModule(MNISTDataModule):
    name = "fashion_mnist"
    torchvision_class = "FashionMNIST"
    class_names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
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
        data = np.asarray(batch["data"])
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")))
    except Exception as err:  # truncation, a foreign pickle, not a dict: all mean "not the release's file"
        raise RuntimeFailure(
            f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err}). Replace it with the file "
            "from cifar-10-python.tar.gz."
        ) from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise RuntimeFailure(
            f"{path} holds image data of shape {data.shape} and type {data.dtype}; a CIFAR-10 batch holds one row of "
            "3072 bytes (3 x 32 x 32, uint8) per image. Replace it with the file from cifar-10-python.tar.gz."
        )
    check_labels(labels, path, "labels")
    if len(labels) != len(data):
        raise RuntimeFailure(f"{path} holds {len(data)} images but {len(labels)} labels. Replace it with the file from "
                             "cifar-10-python.tar.gz.")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


class CIFAR10DataModule(_DownloadableDataModule):
    name = "cifar10"
    torchvision_class = "CIFAR10"
    class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    homepage = "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz)"
    folder = "cifar-10-batches-py"

    def __init__(self, image_size: int = 32, channels: int = 3, random_flip: bool = True, batch_size: int = 128,
                 **kwargs):
        super().__init__(image_size=image_size, channels=channels, random_flip=random_flip, batch_size=batch_size,
                         **kwargs)

    def required_files(self) -> list[str]:
        if self.source_split == "train":
            return [f"data_batch_{i}" for i in range(1, 6)]
        return ["test_batch"]

    def search_dirs(self) -> list[Path]:
        return [self.root / self.folder, self.root]

    @property
    def archive(self) -> Path:
        return self.root / "cifar-10-python.tar.gz"

    def prepare_data(self) -> None:
        """Unpack cifar-10-python.tar.gz when it is under root and the batches are not, then download
        (``data.download=true``) whatever is still missing."""
        if self.find_files() is None and self.archive.is_file():
            self.unpack_archive()
        super().prepare_data()

    def unpack_archive(self) -> None:
        """Copy the batches out of the release archive into ``root/cifar-10-batches-py``.

        Only the known member names are read (so a stranger's archive cannot write anywhere else), each
        file is written to a temporary name and renamed into place (so a truncated archive leaves no
        half-written batch), and batches already there are kept.
        """
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        wanted = {f"{self.folder}/{name}": self.root / self.folder / name for name in names}
        seen = 0
        log.info("unpacking %s into %s", self.archive, self.root / self.folder)
        try:
            with tarfile.open(self.archive, "r:*") as tar:
                for member in tar:
                    target = wanted.get(member.name.removeprefix("./"))
                    if target is None or not member.isfile():
                        continue
                    seen += 1
                    if not target.exists():
                        with tar.extractfile(member) as source:
                            self._write_unpacked(target, source.read())
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise RuntimeFailure(
                f"{self.archive} is truncated or corrupt ({type(err).__name__}: {' '.join(str(err).split())[:200]}), "
                f"e.g. from an interrupted download. Delete it and download it again from {self.homepage}, or "
                "delete it and run with data.download=true."
            ) from err
        if not seen:
            raise RuntimeFailure(
                f"{self.archive} holds none of the CIFAR-10 batches ({self.folder}/data_batch_1 ... test_batch): it is "
                f"not the CIFAR-10 python release. Replace it with cifar-10-python.tar.gz from {self.homepage}."
            )

    def _write_unpacked(self, target: Path, payload: bytes) -> None:
        from gencli.io import atomic_write

        try:
            with atomic_write(target) as f:
                f.write(payload)
        except OSError as err:
            raise RuntimeFailure(f"could not write {target} while unpacking {self.archive} ({err}); make "
                                 f"data.root={self.root} writable and give it about 200 MB of free space.") from err

    def load_images(self) -> tuple[Tensor, Tensor]:
        parts = [read_cifar_batch(p) for p in self.locate().values()]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        return resize_uint8(images, self.image_size), labels
