"""File edges: safe checkpoint loading, atomic writes, image grids and npz archives.

Inside gencli images are float tensors in [-1, 1], NCHW; they become uint8 NHWC only here.
Every file a job writes goes through :func:`atomic_write` (temp file + rename), so an interrupted
run never leaves a half-written PNG, npz, JSON or CSV that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode any other new file would get.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


#: Why a value in a gencli JSON file is null where a number was expected (written beside the list of such keys).
NON_FINITE_NOTE = ("strict JSON cannot hold infinite or not-a-number values: these are written as null (e.g. a GAN's "
                   "train/diversity_gap is +inf during the monitor's warm-up)")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Strict JSON (any parser reads it): non-finite numbers become null, and a top-level mapping gets
    ``non_finite`` ({dotted key: "inf" | "-inf" | "nan"}) with :data:`NON_FINITE_NOTE`, so nothing is lost silently."""
    found: dict[str, str] = {}
    clean = _finite(data, "", found)
    if found and isinstance(clean, dict):
        clean = {**clean, "non_finite": {"values": found, "note": NON_FINITE_NOTE}}
    with atomic_write(path, "w") as f:
        json.dump(clean, f, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
        f.write("\n")
    return Path(path)


def _finite(value: Any, where: str, found: dict[str, str]) -> Any:
    """``value`` with every non-finite float (also in tensors and numpy scalars) replaced by None, noted in found."""
    if isinstance(value, Tensor | np.generic):
        value = _json_default(value)
    if isinstance(value, float) and not math.isfinite(value):
        found[where or "(value)"] = "nan" if value != value else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ----------------------------------------------------------------------------- images
def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC (rounded, clamped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray | Tensor) -> Tensor:
    """uint8 NHWC (or NHW) -> [-1, 1] float NCHW."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """Tile NCHW images in [-1, 1] into one CHW image in [-1, 1] with white separators: torchvision's make_grid,
    ``nrow`` images per row (default: a square), and 1-channel images kept 1-channel (torchvision makes them RGB)."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu()
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)
    return grid[:1] if images.shape[1] == 1 else grid


def save_image_grid(path: str | os.PathLike, images: Tensor, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of ``images`` ([-1, 1], NCHW); ``scale`` enlarges small images for viewing."""
    array = to_uint8(image_grid(images, nrow=nrow).unsqueeze(0))[0]
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    with atomic_write(path) as f:
        pil.save(f, format="PNG")
    return Path(path)


def save_npz(path: str | os.PathLike, images: np.ndarray, **extra: Any) -> Path:
    """Write uint8 NHWC images under the key ``images`` (the layout torch-fidelity and others read)."""
    with atomic_write(path) as f:
        np.savez_compressed(f, images=images, **extra)
    return Path(path)


def auto_scale(image_size: int) -> int:
    """Enlarge tiny images so a grid of 16x16 digits is visible without zooming."""
    return max(1, 64 // image_size)


def _check_batch(images: np.ndarray, shape: tuple[int, ...], written: int, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != len(shape) or tuple(images.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"{what} takes uint8 batches of shape (b, {', '.join(map(str, shape[1:]))}); "
                         f"got {images.dtype} {images.shape}")
    if written + len(images) > shape[0]:
        raise ValueError(f"{what} was opened for {shape[0]} images; {written + len(images)} were written")
    return np.ascontiguousarray(images)


class _CompleteOrNothing:
    """A ``with`` block writes the output whole (``close``) or, on an exception, leaves nothing (``abort``)."""

    def close(self) -> Path:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class NpzImageWriter(_CompleteOrNothing):
    """Stream uint8 NHWC images, batch by batch, into an .npz holding one array ``key`` of shape (n, H, W, C).

    An .npz is a zip of .npy files, so this writes what ``np.savez_compressed(path, images=all_images)``
    would (``np.load(path)["images"]`` reads it) without ever holding more than one batch: the .npy header
    for the final shape goes first, then each batch's bytes, into one ZIP_DEFLATED zip entry (zip64, so
    archives past 4 GiB work). The archive is a temp file beside ``path`` until :meth:`close` has seen
    exactly ``n`` images, then it is renamed into place; :meth:`abort` (or an exception inside a ``with``
    block) deletes it, so an interrupted run never leaves an ``.npz`` that looks complete.
    """

    def __init__(self, path: str | os.PathLike, n: int, image_shape: tuple[int, ...], key: str = "images",
                 compress: bool = True):
        self.path = Path(path)
        self.shape = (int(n), *(int(s) for s in image_shape))
        self.written = 0
        #: small arrays written beside the images at close (the class labels of a conditional model's samples)
        self.extra: dict[str, np.ndarray] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._file = self._zip = self._entry = None
        try:
            os.chmod(self._tmp, 0o666 & ~_UMASK)
            self._file = os.fdopen(fd, "wb")
            self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_DEFLATED if compress else
                                        zipfile.ZIP_STORED, allowZip64=True)
            self._entry = self._zip.open(f"{key}.npy", "w", force_zip64=True)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_1_0(self._entry, header)
        except BaseException:
            if self._file is None:
                os.close(fd)
            self.abort()
            raise

    def write(self, images: np.ndarray) -> None:
        images = _check_batch(images, self.shape, self.written, "NpzImageWriter")
        self._entry.write(memoryview(images).cast("B"))
        self.written += len(images)

    def close(self) -> Path:
        """Finish the archive and rename it to ``path``; refused (and deleted) unless all ``n`` images came."""
        if self.written != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} of {self.shape[0]} images were written; not saved")
        try:
            self._entry.close()
            for key, array in self.extra.items():
                with self._zip.open(f"{key}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.ascontiguousarray(array), allow_pickle=False)
            self._zip.close()
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the unfinished archive (nothing is left at ``path`` or beside it)."""
        for part in (self._entry, self._zip, self._file):
            with contextlib.suppress(Exception):
                if part is not None:
                    part.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)



def png_name(index: int, n: int) -> str:
    """The file name of image ``index`` of ``n``: zero-padded to 6 digits (more when n > 10**6), so names sort
    in index order: 000000.png, 000001.png, ..."""
    return f"{index:0{max(6, len(str(max(n - 1, 0))))}d}.png"


class PngFolderWriter(_CompleteOrNothing):
    """Write uint8 NHWC images as one PNG per image, named by index (:func:`png_name`), into a folder ``path``.

    The files go into a temp folder beside ``path``, renamed to ``path`` by :meth:`close` once all ``n``
    images are in it (a folder already at ``path`` is replaced); :meth:`abort` (or an exception inside a
    ``with`` block) deletes the temp folder, so an interrupted run leaves no ``path`` that looks complete.
    """

    def __init__(self, path: str | os.PathLike, n: int, image_shape: tuple[int, ...]):
        self.path = Path(path)
        self.shape = (int(n), *(int(s) for s in image_shape))
        self.written = 0
        #: small arrays written beside the images at close (the class labels of a conditional model's samples)
        self.extra: dict[str, np.ndarray] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"))
        os.chmod(self._tmp, 0o777 & ~_UMASK)

    def write(self, images: np.ndarray) -> None:
        images = _check_batch(images, self.shape, self.written, "PngFolderWriter")
        for image in images:
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            pil.save(self._tmp / png_name(self.written, self.shape[0]), format="PNG")
            self.written += 1

    def close(self) -> Path:
        """Rename the finished folder to ``path``; refused (and deleted) unless all ``n`` images came."""
        if self.written != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} of {self.shape[0]} images were written; not saved")
        old = None
        try:
            if self.path.exists() or self.path.is_symlink():  # a directory cannot be renamed over a non-empty one
                old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.old.", suffix=".tmp"))
                os.replace(self.path, old / self.path.name)
            os.replace(self._tmp, self.path)
        except BaseException:
            if old is not None and not self.path.exists():
                with contextlib.suppress(OSError):
                    os.replace(old / self.path.name, self.path)  # put the previous folder back
            self.abort()
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)



# ----------------------------------------------------------------------------- checkpoints
# Loading and saving checkpoints lives in gencli.checkpoints (the safe loader, the allow-list check,
# crash-safe saves); these names stay importable from here.
from gencli.checkpoints import load_checkpoint, restore_model  # noqa: E402,F401
