"""Any directory of images, searched recursively; class subfolders become labels.

``data=folder data.root=DIR`` with ``image_size``, ``channels`` and a ``resize`` policy
(``center_crop`` keeps the aspect ratio, ``resize`` stretches).

``lazy: true`` (the default) lists the files at set-up and nothing more: each image is decoded and
resized when a batch asks for it, i.e. in the loader workers (``hardware.num_workers``), so start-up
time and memory do not grow with the folder's decoded size (a 1M-image folder is a 1M-line listing,
kept as one bytes buffer, not 1M Python objects that every worker would copy). ``cache_dir=DIR``
keeps the decoded, resized uint8 images in a numpy file there (:class:`DecodedCache`), filled on first
use: the second epoch and later runs read pixels instead of decoding JPEGs. ``lazy: false`` is the
old behaviour: every image decoded once, in a thread pool, at set-up and held in memory.

Unreadable files: eager set-up skips them and counts them in one warning. A lazy loader meets them
only when a batch asks for one; it then serves the next readable image of the split in its place, so
a run with one bad JPEG in a million keeps going, and warns (once per file and loader process) naming
the file and the reason. With a cache the file is remembered as unreadable, and the next set-up
counts such files in one warning. Only when no image can be decoded at all is it an error.

:func:`read_image_uint8` is the one decoder of image files (this loader and ``gencli eval
samples=DIR`` both use it): 8-bit images of any PIL mode (palette, LA, RGBA, CMYK, 1-bit) are
converted by PIL; 16-bit images (PNG, TIFF, PGM) are scaled to 8 bits by keeping the high byte;
images whose value range cannot be known (floating point, or 32-bit integers beyond 16 bits) are
refused rather than guessed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gencli.data.base import ImageDataModule, UInt8ImageDataset, resize_uint8
from gencli.errors import ConfigError, RuntimeFailure

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def scan_images(root: Path) -> list[str]:
    """The image files under ``root`` as relative POSIX paths, in :func:`list_images` order.

    The same files as ``root.rglob("*")`` filtered by suffix and ``is_file()`` (symlinked files are
    followed, symlinked folders are not, as Python 3.11's rglob does), found with ``os.scandir``: its
    entries know their type without a ``stat`` call per regular file, about 4x faster on a 50k-file folder.
    """
    found: list[str] = []
    folders = [("", str(root))]
    while folders:
        prefix, folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue  # as rglob: an unreadable subfolder contributes nothing
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append((f"{prefix}{entry.name}/", entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                found.append(prefix + entry.name)
    # Path order (part by part), so that 'a/b.png' sorts before 'a-b.png' exactly as sorted(Path) does.
    found.sort(key=lambda rel: rel.split("/"))
    return found


def list_images(root: Path) -> list[Path]:
    root = Path(root)
    return [root / rel for rel in scan_images(root)]

class UnreadableImage(ValueError):
    """A file that is not an image gencli can decode; the message names the file and the reason."""


class UnsupportedBitDepth(UnreadableImage):
    """A readable high-bit-depth image whose value range cannot be mapped to 0..255 without guessing."""


#: PIL modes whose pixels are one gray value (what ``channels=None`` keeps as one channel).
GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}
#: What a corrupt or foreign file raises somewhere inside PIL's plugins, at open or at load.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error,
                 Image.DecompressionBombError)


def _gray_uint8(img: Image.Image, path: Path) -> np.ndarray:
    """A high-bit-depth single-channel image (PIL modes I;16*, I, F) as uint8 HxW."""
    array = np.asarray(img)
    if array.dtype.kind == "f":
        raise UnsupportedBitDepth(
            f"{path} is a floating-point image (PIL mode {img.mode}) whose value range cannot be known; "
            "save it as an 8- or 16-bit image"
        )
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise UnsupportedBitDepth(
            f"{path} is a {array.dtype.itemsize * 8}-bit integer image (PIL mode {img.mode}) with values "
            f"{low}..{high}, beyond the 16-bit range 0..65535, so its scale cannot be known; save it as an "
            "8- or 16-bit image"
        )
    # 16 bits -> 8 by keeping the high byte (v >> 8), not round(v / 257): PIL itself reads 16-bit RGB(A)
    # PNGs that way, so a 16-bit gray image and the same picture saved as 16-bit RGB give the same
    # pixels; and an 8-bit image widened the standard way (v * 257) comes back exactly.
    return (array.astype(np.uint32) >> 8).astype(np.uint8)


def read_image_uint8(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 HxWxC.

    ``channels`` 1 gives gray (ITU-R 601 luma for colour files), 3 gives RGB (gray replicated);
    ``None`` keeps what the file holds: 1 channel for gray modes, else 3 (alpha is dropped).
    Raises :class:`UnreadableImage` (or its :class:`UnsupportedBitDepth`) naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            high_bit_depth = img.mode in ("I", "F") or img.mode.startswith(("I;", "F;"))
            if high_bit_depth:
                array = _gray_uint8(img, path)
            else:
                gray = img.mode in GRAY_MODES or (img.mode == "P" and img.palette is not None and img.palette.mode == "L")
                want = channels if channels is not None else (1 if gray else 3)
                array = np.asarray(img.convert("L" if want == 1 else "RGB"), dtype=np.uint8)
    except UnreadableImage:
        raise
    except DECODE_ERRORS as err:
        raise UnreadableImage(f"{path} is not a readable image ({type(err).__name__}: {err})") from err
    if array.ndim == 2:
        array = array[..., None]
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


class Decoder:
    """File -> uint8 CHW at ``image_size`` (crop or stretch, then bicubic), or the UnreadableImage saying why not.

    A small picklable object, not a method of the data module, so a loader worker started by ``spawn``
    receives these three numbers, not the whole data module (and its trainer)."""

    def __init__(self, image_size: int, channels: int, resize: str):
        self.image_size, self.channels, self.resize = int(image_size), int(channels), resize

    def __call__(self, path: str | os.PathLike) -> np.ndarray | UnreadableImage:
        try:
            array = read_image_uint8(path, self.channels)
        except UnreadableImage as err:
            return err
        img = Image.fromarray(array[..., 0] if self.channels == 1 else array)
        w, h = img.size
        if self.resize == "center_crop" and w != h:
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC, reducing_gap=None)
        array = np.asarray(img, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


class FileTable:
    """Relative file paths as one bytes buffer and an offsets array.

    A list of 1M str (or Path) objects costs ~100 (~400) bytes each and, worse, every forked loader
    worker slowly copies it (touching an object's reference count writes to its page); two numpy
    arrays are a few bytes per file and stay shared."""

    def __init__(self, names: list[str]):
        encoded = [os.fsencode(name) for name in names]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i]: self.offsets[i + 1]].tobytes())


#: A cache stamp: 0 = not filled yet, UNREADABLE = the file could not be decoded, else FILLED | crc32 of the pixels.
UNREADABLE, FILLED = 1, 0x80000000
#: Bump when the cache layout or the decoding changes, so that old caches are not read as current.
CACHE_VERSION = 1


class DecodedCache:
    """Decoded, resized uint8 images of one folder listing in ``cache_dir``, filled on first use.

    ``images.npy`` (N, C, S, S) uint8 and ``stamps.npy`` (N,) uint32, opened as shared memory maps in
    every process, so loader workers fill it together. An image's stamp is written after its pixels and
    holds their CRC-32: a run killed half way (or a power cut that wrote the stamp page but not the
    pixel page) leaves stamps that are 0 or do not match, and those images are decoded again; a half
    cache is never read as complete. Two workers filling the same image write the same bytes. The
    folder name is a hash of every file's relative path, size and modification time and of the
    decoding settings, so a changed, added or removed file, or another image_size, means another
    cache, never stale pixels. Files are created under a temporary name and renamed into place, and
    read with ``allow_pickle=False``: a cache folder someone else wrote can hold only pixels.
    """

    def __init__(self, folder: Path, n: int, shape: tuple[int, int, int]):
        self.folder, self.n, self.shape = folder, n, tuple(shape)
        self._images = self._stamps = None

    @staticmethod
    def key(root: Path, names: list[str], decoder: Decoder) -> str:
        digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "image_size": decoder.image_size,
                                            "channels": decoder.channels, "resize": decoder.resize}).encode())
        for name in names:
            st = os.stat(root / name)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()[:24]

    @classmethod
    def open_or_create(cls, cache_dir: Path, root: Path, names: list[str], decoder: Decoder) -> DecodedCache:
        shape = (decoder.channels, decoder.image_size, decoder.image_size)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"data.cache_dir={cache_dir} cannot be created ({err.strerror or err}); give a writable "
                              "folder, or data.cache_dir=null to decode every epoch without a cache.") from err
        cache = cls(cache_dir / f"folder-{cls.key(root, names, decoder)}", len(names), shape)
        if cache.folder.is_dir():
            problem = cache._check()
            if problem is None:
                return cache
            warnings.warn(f"data.cache_dir: {cache.folder} {problem}; it is rebuilt.", stacklevel=3)
            shutil.rmtree(cache.folder, ignore_errors=True)
        cache._create(root)
        return cache

    def _create(self, root: Path) -> None:
        tmp = self.folder.with_name(f"{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        size = self.n * int(np.prod(self.shape)) + 4 * self.n
        try:
            tmp.mkdir()
            for name, dtype, shape in (("images", np.uint8, (self.n, *self.shape)), ("stamps", np.uint32, (self.n,))):
                array = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                array.flush()
                del array
                # Reserve the blocks now: a full disk is this one paragraph at start-up, not a SIGBUS in a loader
                # worker when it first writes to a hole of a sparse file.
                with open(tmp / f"{name}.npy", "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            (tmp / "manifest.json").write_text(json.dumps(
                {"root": str(root), "n": self.n, "shape": list(self.shape), "version": CACHE_VERSION}, indent=1))
            tmp.rename(self.folder)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.folder.is_dir():  # (when it exists, another process created it first: use theirs)
                raise ConfigError(
                    f"data.cache_dir={self.folder.parent} cannot hold the decoded-image cache of {self.n} images "
                    f"({size / 2**20:.0f} MiB): {err.strerror or err}. Give a writable folder with room, or "
                    "data.cache_dir=null to decode every epoch without a cache."
                ) from err
        problem = self._check()
        if problem is not None:
            raise RuntimeFailure(f"data.cache_dir: {self.folder} {problem} right after it was created; is the disk full?")

    def _check(self) -> str | None:
        """None when the two arrays open with the expected types and shapes, else what is wrong."""
        try:
            self._open()
        except PermissionError as err:
            raise ConfigError(f"data.cache_dir: {self.folder} cannot be opened for writing ({err.strerror}); make it "
                              "writable, or give another data.cache_dir (null: no cache).") from err
        except (OSError, ValueError, EOFError) as err:
            self._images = self._stamps = None
            return f"is unreadable ({type(err).__name__}: {err})"
        if (self._images.dtype, self._images.shape) != (np.uint8, (self.n, *self.shape)) or \
                (self._stamps.dtype, self._stamps.shape) != (np.uint32, (self.n,)):
            found = f"{self._images.dtype} {self._images.shape} and {self._stamps.dtype} {self._stamps.shape}"
            self._images = self._stamps = None
            return f"holds arrays of the wrong kind ({found})"
        return None

    def _open(self) -> None:
        if self._images is None:
            self._images = np.load(self.folder / "images.npy", mmap_mode="r+", allow_pickle=False)
            self._stamps = np.load(self.folder / "stamps.npy", mmap_mode="r+", allow_pickle=False)

    def __getstate__(self) -> dict:
        # a worker started by spawn maps the files itself (pickling a memmap would copy the whole cache)
        return {**self.__dict__, "_images": None, "_stamps": None}

    def get(self, i: int) -> np.ndarray | None:
        """The cached image i, or None when it is not (validly) filled."""
        self._open()
        stamp = int(self._stamps[i])
        if not stamp & FILLED:
            return None
        array = np.array(self._images[i])
        return array if (zlib.crc32(array) | FILLED) == stamp else None

    def put(self, i: int, array: np.ndarray) -> None:
        self._open()
        self._images[i] = array
        self._stamps[i] = zlib.crc32(np.ascontiguousarray(array)) | FILLED  # after the pixels: see the class doc

    def is_unreadable(self, i: int) -> bool:
        self._open()
        return int(self._stamps[i]) == UNREADABLE

    def mark_unreadable(self, i: int) -> None:
        self._open()
        self._stamps[i] = UNREADABLE

    def unreadable(self) -> np.ndarray:
        """Indices of the files an earlier run found unreadable."""
        self._open()
        return np.flatnonzero(self._stamps == UNREADABLE)


class NoReadableImage(RuntimeFailure):
    """No file of a split decodes (raised where the images are read, perhaps in a loader worker).

    A DataLoader re-raises a worker's exception in the main process as ``type(err)(text)``, the text
    being "Caught ... in DataLoader worker process 0. Original Traceback ...". This class keeps only its own
    message from that text, so the user still reads one paragraph, not a worker's traceback."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1]
        super().__init__(message)


class FolderImages:
    """Images of a folder listing as a read-only uint8 'tensor' (N, C, S, S), decoded when indexed.

    It stands where the eager loader holds a tensor (``UInt8ImageDataset.images``), with what its users
    do to one: ``len``, ``.shape``, ``images[i]``, ``images[a:b]`` and ``images[index_tensor]``. So the
    training loader, the reference statistics of a split and the domain classifier read a lazy folder
    unchanged, and the decoding happens in whichever process indexes it: the loader workers when training.
    ``index`` maps this view's positions to the listing (and the cache, which covers the whole listing).
    """

    def __init__(self, root: Path, files: FileTable, decoder: Decoder, cache: DecodedCache | None = None,
                 index: np.ndarray | None = None):
        self.root, self.files, self.decoder, self.cache = Path(root), files, decoder, cache
        self.index = np.arange(len(files), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        self.shape = torch.Size((len(self.index), decoder.channels, decoder.image_size, decoder.image_size))
        self.dtype = torch.uint8
        self._warned: set[int] = set()

    def subset(self, positions) -> FolderImages:
        return FolderImages(self.root, self.files, self.decoder, self.cache, self.index[np.asarray(positions)])

    def __len__(self) -> int:
        return len(self.index)

    def path(self, position: int) -> Path:
        return self.root / self.files[int(self.index[position])]

    def __getitem__(self, item) -> Tensor:
        if isinstance(item, int | np.integer) or (isinstance(item, Tensor) and item.ndim == 0):
            position = int(item)
            if not -len(self) <= position < len(self):
                raise IndexError(f"image {position} of {len(self)}")
            return torch.from_numpy(np.array(self._load(position % len(self))))  # (a copy: PIL's arrays are read-only)
        positions = range(len(self))[item] if isinstance(item, slice) else np.asarray(item, dtype=np.int64).reshape(-1)
        batch = np.empty((len(positions), *self.shape[1:]), dtype=np.uint8)
        for row, position in enumerate(positions):
            batch[row] = self._load(int(position))
        return torch.from_numpy(batch)

    def __iter__(self):
        for position in range(len(self)):
            yield self[position]

    def _load(self, position: int) -> np.ndarray:
        """Image ``position``; an unreadable file is warned about and the next readable one serves in its place."""
        for step in range(len(self)):
            here = (position + step) % len(self)
            array = self._decode(here)
            if array is not None:
                return array
        raise NoReadableImage(f"data=folder: none of the {len(self)} image files of this split under {self.root} can be "
                              f"decoded (first: {self.path(position)}); check data.root.")

    def _decode(self, position: int) -> np.ndarray | None:
        i = int(self.index[position])
        if self.cache is not None:
            array = self.cache.get(i)
            if array is not None:
                return array
            if self.cache.is_unreadable(i):
                return None  # counted in the set-up warning
        result = self.decoder(self.root / self.files[i])
        if isinstance(result, UnreadableImage):
            if self.cache is not None:
                self.cache.mark_unreadable(i)
            if i not in self._warned:
                self._warned.add(i)
                warnings.warn(f"data=folder skipped an unreadable file: {result}. The next readable image of the split "
                              "serves in its place; convert or remove the file to use it.", stacklevel=2)
            return None
        if self.cache is not None:
            self.cache.put(i, result)
        return result


class FolderDataModule(ImageDataModule):
    name = "folder"

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        resize: str = "center_crop",
        batch_size: int = 128,
        lazy: bool = True,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, **kwargs)
        if resize not in ("center_crop", "resize"):
            raise ConfigError(f"data.resize={resize!r} is not a resize policy; use center_crop or resize.")
        if not isinstance(lazy, bool):
            raise ConfigError(f"data.lazy={lazy!r} is not true or false; true decodes images as batches need them, "
                              "false decodes the whole folder into memory at start-up.")
        if cache_dir is not None and not lazy:
            raise ConfigError(f"data.cache_dir={cache_dir} caches the images a lazy loader decodes; with data.lazy=false "
                              "they are all decoded into memory at start-up. Drop data.cache_dir or set data.lazy=true.")
        self.root = Path(str(root)).expanduser() if root else None
        self.resize = resize
        self.lazy = lazy
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None
        self.decoder = Decoder(self.image_size, self.channels, resize)
        self.cache: DecodedCache | None = None
        self.skipped: list[Path] = []
        #: Why each skipped file was skipped (the UnreadableImage it raised).
        self.skip_reasons: dict[Path, UnreadableImage] = {}
        self.class_names: list[str] = []
        self._names: list[str] | None = None
        self._classes: list[str] | None = None  # what classes() found ([] for an unlabelled folder)

    def describe(self) -> dict:
        # lazy is part of the identity: with unreadable files the two modes split different listings
        return {**super().describe(), "root": str(self.root), "resize": self.resize, "lazy": self.lazy}

    def _listing(self) -> list[str]:
        """The image files under root (relative, sorted), listed once: classes() and setup() share it."""
        if self._names is None:
            if self.root is None or not self.root.is_dir():
                raise ConfigError(
                    f"data.root={self.root} is not a directory. data=folder needs data.root=DIR, a folder of images "
                    "(searched recursively; one subfolder per class gives labels)."
                )
            self._names = scan_images(self.root)
        return self._names

    def classes(self) -> list[str] | None:
        """The class subfolders, sorted (label i is the i-th), from the file names alone; None when any image lies
        directly under root (then the folder is unlabelled: a conditional model on it is refused)."""
        if self.root is None or not self.root.is_dir():
            return None
        if self._classes is None:
            names = self._listing()
            labelled = names and all("/" in name for name in names)
            self._classes = sorted({name.split("/", 1)[0] for name in names}) if labelled else []
        return list(self._classes) or None

    def _listing_with_labels(self) -> tuple[list[str], Tensor]:
        """The listing (never empty) and each file's label: its class subfolder's index, or -1 directly under root."""
        names = self._listing()
        if not names:
            raise ConfigError(
                f"data.root={self.root} holds no images (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
        self.class_names = sorted({name.split("/", 1)[0] for name in names if "/" in name})
        class_index = {name: i for i, name in enumerate(self.class_names)}
        labels = torch.tensor([class_index[name.split("/", 1)[0]] if "/" in name else -1 for name in names],
                              dtype=torch.long)
        return names, labels

    def _decode(self, path: Path) -> np.ndarray | UnreadableImage:
        """uint8 CHW at ``image_size``, or the UnreadableImage that says why the file is skipped."""
        return self.decoder(path)

    def setup(self, stage: str | None = None) -> None:
        if not self.lazy:
            return super().setup(stage)
        if self.train_set is not None:
            return
        names, labels = self._listing_with_labels()
        if self.cache_dir is not None:
            self.cache = DecodedCache.open_or_create(self.cache_dir, self.root, names, self.decoder)
        self.classes()  # (known before the listing is dropped)
        images = FolderImages(self.root, FileTable(names), self.decoder, self.cache)
        self._names = None  # the file table holds the listing now (a third of the memory, no per-file objects)
        self._check_decodable(images)
        n = len(names) if self.max_images is None else min(len(names), int(self.max_images))
        val_idx, train_idx = self.split_indices(n)
        self.train_set = UInt8ImageDataset(images.subset(train_idx.numpy()), labels[train_idx], self.random_flip)
        self.val_set = UInt8ImageDataset(images.subset(val_idx.numpy()), labels[val_idx])
        log.info("%s: %d train / %d val images of shape %s, decoded lazily%s", self.name, len(train_idx), len(val_idx),
                 self.image_shape, f" (cache: {self.cache.folder})" if self.cache is not None else "")

    #: How many files, in listing order, set-up may decode to find one readable image before calling the folder broken.
    PROBE = 64

    def _check_decodable(self, images: FolderImages) -> None:
        """Decode the first readable file (normally the first file) in this process, so a folder of non-images
        fails at start-up, not in a worker; and count the files a cache already knows to be unreadable."""
        known = self.cache.unreadable() if self.cache is not None else np.zeros(0, np.int64)
        if len(known):
            first = self.root / images.files[int(known[0])]
            warnings.warn(f"data=folder skips {len(known)} of {len(images)} file(s) under {self.root} that an earlier "
                          f"run found unreadable (first: {first}); the next readable image serves in the place of each. "
                          "Convert or remove them to use them.", stacklevel=3)
        reasons = []
        for position in range(min(len(images), self.PROBE)):
            i = int(images.index[position])
            if self.cache is not None and self.cache.get(i) is not None:
                return
            result = self.decoder(images.path(position))
            if not isinstance(result, UnreadableImage):
                if self.cache is not None:
                    self.cache.put(i, result)
                return
            reasons.append(result)
        probed = "none of the" if len(reasons) == len(images) else f"none of the first {len(reasons)} of the"
        raise ConfigError(f"data.root={self.root}: {probed} {len(images)} image files could be decoded "
                          f"(first: {reasons[0]}).")

    def load_images(self) -> tuple[Tensor, Tensor]:
        """The eager loader (``lazy: false``): every image decoded now, unreadable files skipped and counted."""
        names, all_labels = self._listing_with_labels()
        paths = [self.root / name for name in names]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(self.decoder, paths))
        images, labels = [], []
        self.skipped, self.skip_reasons = [], {}
        for path, label, array in zip(paths, all_labels.tolist(), decoded):
            if isinstance(array, UnreadableImage):
                self.skipped.append(path)
                self.skip_reasons[path] = array
                continue
            images.append(array)
            labels.append(label)
        if self.skipped:
            warnings.warn(self._skip_warning(len(paths)), stacklevel=2)
        if not images:
            raise ConfigError(f"data.root={self.root}: none of the {len(paths)} image files could be decoded "
                              f"(first: {self.skip_reasons[self.skipped[0]]}).")
        stacked = torch.from_numpy(np.stack(images))
        return resize_uint8(stacked, self.image_size), torch.tensor(labels, dtype=torch.long)

    def _skip_warning(self, total: int) -> str:
        """One paragraph: how many files were skipped, split into undecodable files and high-bit-depth
        images of a kind gencli will not guess the scale of, each with its first file and reason."""
        reasons = [self.skip_reasons[p] for p in self.skipped]
        unsupported = [r for r in reasons if isinstance(r, UnsupportedBitDepth)]
        undecodable = [r for r in reasons if not isinstance(r, UnsupportedBitDepth)]
        parts = []
        if undecodable:
            parts.append(f"{len(undecodable)} could not be decoded as images (first: {undecodable[0]})")
        if unsupported:
            parts.append(f"{len(unsupported)} high-bit-depth image(s) of an unsupported kind (first: {unsupported[0]})")
        return (f"data=folder skipped {len(self.skipped)} of {total} file(s) under {self.root}: "
                f"{'; '.join(parts)}. Convert or remove them to use them.")
