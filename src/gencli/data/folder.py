"""Any directory of images, searched recursively; class subfolders become labels.

``data=folder data.root=DIR`` with ``image_size``, ``channels`` and a ``resize`` policy
(``center_crop`` keeps the aspect ratio, ``resize`` stretches). Images are decoded once, in a thread
pool, at set-up and held in memory at the target size. Files that cannot be decoded are skipped and
counted in one warning, so one bad JPEG does not stop a run, and is not silently lost either.

:func:`read_image_uint8` is the one decoder of image files (this loader and ``gencli eval
samples=DIR`` both use it): 8-bit images of any PIL mode (palette, LA, RGBA, CMYK, 1-bit) are
converted by PIL; 16-bit images (PNG, TIFF, PGM) are scaled to 8 bits by keeping the high byte;
images whose value range cannot be known (floating point, or 32-bit integers beyond 16 bits) are
refused rather than guessed.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gencli.data.base import ImageDataModule, resize_uint8
from gencli.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


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


class FolderDataModule(ImageDataModule):
    name = "folder"

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        resize: str = "center_crop",
        batch_size: int = 128,
        **kwargs,
    ):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, **kwargs)
        if resize not in ("center_crop", "resize"):
            raise ConfigError(f"data.resize={resize!r} is not a resize policy; use center_crop or resize.")
        self.root = Path(str(root)).expanduser() if root else None
        self.resize = resize
        self.skipped: list[Path] = []
        #: Why each skipped file was skipped (the UnreadableImage it raised).
        self.skip_reasons: dict[Path, UnreadableImage] = {}
        self.class_names: list[str] = []

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "resize": self.resize}

    def classes(self) -> list[str] | None:
        """The class subfolders, sorted (label i is the i-th), from the file names alone; None when any image lies
        directly under root (then the folder is unlabelled: a conditional model on it is refused)."""
        if self.root is None or not self.root.is_dir():
            return None
        parts = [p.relative_to(self.root).parts for p in list_images(self.root)]
        if not parts or any(len(p) == 1 for p in parts):
            return None
        return sorted({p[0] for p in parts})

    def _decode(self, path: Path) -> np.ndarray | UnreadableImage:
        """uint8 CHW at ``image_size``, or the UnreadableImage that says why the file is skipped."""
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

    def load_images(self) -> tuple[Tensor, Tensor]:
        if self.root is None or not self.root.is_dir():
            raise ConfigError(
                f"data.root={self.root} is not a directory. data=folder needs data.root=DIR, a folder of images "
                "(searched recursively; one subfolder per class gives labels)."
            )
        paths = list_images(self.root)
        if not paths:
            raise ConfigError(
                f"data.root={self.root} holds no images (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
        top_dirs = sorted({p.relative_to(self.root).parts[0] for p in paths if len(p.relative_to(self.root).parts) > 1})
        self.class_names = top_dirs
        class_index = {name: i for i, name in enumerate(top_dirs)}
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(self._decode, paths))
        images, labels = [], []
        self.skipped, self.skip_reasons = [], {}
        for path, array in zip(paths, decoded):
            if isinstance(array, UnreadableImage):
                self.skipped.append(path)
                self.skip_reasons[path] = array
                continue
            parts = path.relative_to(self.root).parts
            images.append(array)
            labels.append(class_index[parts[0]] if len(parts) > 1 else -1)
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
