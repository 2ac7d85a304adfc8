"""Any directory of images, searched recursively; class subfolders become labels.

``data=folder data.root=DIR`` with ``image_size``, ``channels`` and a ``resize`` policy
(``center_crop`` keeps the aspect ratio, ``resize`` stretches). Images are decoded once, in a thread
pool, at set-up and held in memory at the target size. Files that cannot be decoded are skipped and
counted in one warning, so one bad JPEG does not stop a run, and is not silently lost either.
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from gencli.data.base import ImageDataModule, resize_uint8
from gencli.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class FolderDataModule(ImageDataModule):
    name = "folder"

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        resize: str = "center_crop",
        **kwargs,
    ):
        super().__init__(image_size=image_size, channels=channels, **kwargs)
        if resize not in ("center_crop", "resize"):
            raise ConfigError(f"data.resize={resize!r} is not a resize policy; use center_crop or resize.")
        self.root = Path(str(root)).expanduser() if root else None
        self.resize = resize
        self.skipped: list[Path] = []
        self.class_names: list[str] = []

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "resize": self.resize}

    def _decode(self, path: Path) -> np.ndarray | None:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                w, h = img.size
                if self.resize == "center_crop" and w != h:
                    side = min(w, h)
                    left, top = (w - side) // 2, (h - side) // 2
                    img = img.crop((left, top, left + side, top + side))
                if img.size != (self.image_size, self.image_size):
                    img = img.resize((self.image_size, self.image_size), Image.BICUBIC, reducing_gap=None)
                array = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None
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
        self.skipped = []
        for path, array in zip(paths, decoded):
            if array is None:
                self.skipped.append(path)
                continue
            parts = path.relative_to(self.root).parts
            images.append(array)
            labels.append(class_index[parts[0]] if len(parts) > 1 else -1)
        if self.skipped:
            warnings.warn(
                f"data=folder skipped {len(self.skipped)} of {len(paths)} file(s) under {self.root} that could not be "
                f"decoded as images (first: {self.skipped[0]}).",
                stacklevel=2,
            )
        if not images:
            raise ConfigError(f"data.root={self.root}: none of the {len(paths)} image files could be decoded.")
        stacked = torch.from_numpy(np.stack(images))
        return resize_uint8(stacked, self.image_size), torch.tensor(labels, dtype=torch.long)
