"""File edges: safe checkpoint loading, atomic writes, image grids and npz archives.

Inside gencli images are float tensors in [-1, 1], NCHW; they become uint8 NHWC only here.
Every file a job writes goes through :func:`atomic_write` (temp file + rename), so an interrupted
run never leaves a half-written PNG, npz, JSON or CSV that looks complete.

Temporary names carry their writer (:func:`temp_name`: ``.<name>.<pid>@<host>.<random>.tmp``), so that what a
killed process left behind can be told from what a live one is writing. An unfinished output is dropped with
:func:`discard`: renamed at once to ``.trash.<pid>@<host>.<random>.<name>`` (nothing at its old name looks like
output any more), deleted on the spot when that is quick, else by a background process, so a stopped run exits in
well under a second even with ~100k PNGs to delete. :func:`clean_leftovers` (run by every job on its output
folder) removes temp files of processes that no longer exist, and trash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    try:
        # mkstemp makes the file private (0600); give it the mode any other new file would get.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        discard(tmp, path)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- temp files, trash, leftovers
TEMP_SUFFIX = ".tmp"
TRASH_PREFIX = ".trash."
#: This machine, as it appears in temp names: the first 6 hex digits of the SHA-1 of its host name (a pid means
#: something only on the machine that owns it; run folders may be on a file system shared by several).
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
_OWNER = r"(?P<pid>\d+)@(?P<host>[0-9a-f]{6})"
_TEMP = re.compile(rf"^\.(?P<name>.+)\.{_OWNER}\.[A-Za-z0-9_]+{re.escape(TEMP_SUFFIX)}$")
_TRASH = re.compile(rf"^{re.escape(TRASH_PREFIX)}{_OWNER}\.[0-9a-f]+\.(?P<name>.+)$")
#: Temp names of gencli versions before the writer was part of the name: ``.<name>.<8 random>.tmp``.
_LEGACY_TEMP = re.compile(rf"^\.(?P<name>.+)\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}$")
#: A temp file whose owner cannot be checked (an older gencli's, another machine's) counts as abandoned only once
#: nothing has touched it for this long (a folder being written to changes its mtime with every file).
UNOWNED_AFTER_S = 24 * 3600.0
#: How long :func:`discard` deletes in the foreground before it hands the rest to a background process.
DISCARD_BUDGET_S = 0.25


def owner_tag(pid: int | None = None) -> str:
    """``<pid>@<host tag>``: who writes a temp file (this process by default)."""
    return f"{os.getpid() if pid is None else int(pid)}@{HOST_TAG}"


def temp_prefix(name: str) -> str:
    """The start of a temp name beside ``name`` (mkstemp/mkdtemp add a random part and :data:`TEMP_SUFFIX`)."""
    return f".{name}.{owner_tag()}."


def temp_name(name: str) -> str:
    """A fresh temp name beside ``name``, owned by this process: ``.<name>.<pid>@<host>.<random>.tmp``."""
    return f"{temp_prefix(name)}{secrets.token_hex(4)}{TEMP_SUFFIX}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal exists too)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: keep its files
    return True


@dataclass
class Discarded:
    """An unfinished output that was dropped: where it would have gone, how far it got, and the trash still
    being deleted in the background (None: already gone)."""

    target: Path
    written: int | None = None
    total: int | None = None
    pending: Path | None = None


#: What :func:`discard` dropped in this process, oldest first (read by the jobs' stop message; see
#: :func:`gencli.jobs.common.run_job`).
DISCARDED: list[Discarded] = []
_DELETERS: list[subprocess.Popen] = []


def discard(path: str | os.PathLike, target: str | os.PathLike | None = None, written: int | None = None,
            total: int | None = None, budget: float = DISCARD_BUDGET_S, unfinished: bool = True) -> Discarded | None:
    """Remove the unfinished output at ``path`` (a temp file or folder) quickly, whatever its size.

    A file is unlinked. A folder is first renamed to a trash name in the same folder (atomic, instant), then
    deleted for up to ``budget`` seconds; what is left is deleted by a detached background process, and if
    that is cut short too, by the next gencli run in this folder (:func:`clean_leftovers`). ``target`` (the name
    the output would have had), ``written`` and ``total`` are recorded in :data:`DISCARDED` for the stop message
    (``unfinished=False``: not recorded, e.g. a complete output being replaced by a newer one).
    """
    path = Path(path)
    record = Discarded(Path(target) if target is not None else path, written, total)
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if unfinished:
            DISCARDED.append(record)
        return record
    name = Path(target).name if target is not None else path.name.lstrip(".")
    trash = path.with_name(f"{TRASH_PREFIX}{owner_tag()}.{secrets.token_hex(4)}.{name}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path  # (e.g. a read-only parent: deleting will fail too, and the message says what is left)
    if not remove_tree(trash, time.monotonic() + budget):
        record.pending = trash if _delete_in_background(trash) or trash.exists() else None
    if unfinished:
        DISCARDED.append(record)
    return record


def remove_tree(path: str | os.PathLike, deadline: float | None = None) -> bool:
    """Delete ``path`` (a folder tree; symlinks are removed, never followed); False if ``deadline``
    (``time.monotonic()``) passed first, leaving the rest in place.

    Walked by open folder descriptors, each entry unlinked relative to its folder's descriptor and each sub-folder
    opened with O_NOFOLLOW: an entry swapped for a link to a folder elsewhere between the listing and the removal is
    removed as a link, never entered (a walk by path names would delete what the link leads to)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        top = os.open(path, flags)
    except FileNotFoundError:
        return True
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            return False
        try:  # a link (or a file) where the folder was: removed itself
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True
    stack: list[tuple[int, int | None, str | None]] = [(top, None, None)]  # (folder, its parent's fd, its name)
    checked = 0
    try:
        while stack:
            fd, parent, name = stack[-1]
            child: tuple[int, int, str] | None = None
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        checked += 1
                        if deadline is not None and checked % 32 == 0 and time.monotonic() > deadline:
                            return False
                        if entry.is_dir(follow_symlinks=False):
                            try:
                                child = (os.open(entry.name, flags, dir_fd=fd), fd, entry.name)
                                break
                            except FileNotFoundError:
                                continue
                            except OSError as err:
                                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                                    return False  # swapped for a link or a file since listed: unlinked below
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.name, dir_fd=fd)
            except OSError:
                return False
            if child is not None:
                stack.append(child)  # its parent is listed again once it is gone
                continue
            stack.pop()
            os.close(fd)
            try:
                if parent is not None:
                    os.rmdir(name, dir_fd=parent)
                else:
                    os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                return False
    finally:
        for fd, _, _ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
    return True


_DELETER = "import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True)"


def _delete_in_background(path: Path) -> bool:
    """Start a detached process that deletes ``path`` (it outlives this one, and a Ctrl+C at the terminal does
    not reach it); False if it could not be started."""
    try:
        _DELETERS.append(subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _DELETER, str(path)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True))
    except (OSError, ValueError):
        return False
    return True


def leftover_owner(name: str) -> tuple[str, int | None, str | None] | None:
    """``(kind, pid, host tag)`` of a gencli temp or trash name (kind ``temp``, ``trash`` or ``legacy``: an older
    gencli's temp name, owner unknown), or None for any other name."""
    for kind, pattern in (("trash", _TRASH), ("temp", _TEMP)):
        match = pattern.match(name)
        if match:
            return kind, int(match["pid"]), match["host"]
    return ("legacy", None, None) if _LEGACY_TEMP.match(name) else None


def abandoned(path: Path, now: float | None = None) -> bool:
    """Whether the gencli temp or trash entry ``path`` belongs to nobody any more: trash always (nobody needs it;
    its owner may be deleting it: then both delete); a temp name of this machine when its process is gone; a
    temp name of another machine or of an older gencli when nothing touched it for :data:`UNOWNED_AFTER_S`."""
    owner = leftover_owner(path.name)
    if owner is None:
        return False
    kind, pid, host = owner
    if kind == "trash":
        return not (host == HOST_TAG and pid is not None and process_alive(pid))
    if kind == "temp" and host == HOST_TAG:
        return not process_alive(pid)
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > UNOWNED_AFTER_S


def clean_leftovers(*folders: str | os.PathLike, legacy: bool = True) -> list[Path]:
    """Remove, from the top level of each of ``folders``, the temp files and folders of gencli processes that no
    longer exist, and trash (:func:`abandoned`); a live process's temp files are never touched. ``legacy=False``
    leaves the temp names of older gencli versions alone (a folder that is not gencli's own, such as export's
    ``out=``: a name like ``.notes.a1b2c3d4.tmp`` there may be anyone's). Returns what was removed (logged as one
    warning)."""
    removed: list[Path] = []
    for folder in folders:
        try:
            entries = [Path(entry.path) for entry in os.scandir(folder) if entry.name.startswith(".")]
        except OSError:
            continue
        for entry in entries:
            if not abandoned(entry) or (not legacy and leftover_owner(entry.name)[0] == "legacy"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                if remove_tree(entry) or not entry.exists():
                    removed.append(entry)
            else:
                with contextlib.suppress(FileNotFoundError):
                    try:
                        entry.unlink()
                    except OSError:
                        continue
                removed.append(entry)
    if removed:
        log.warning("removed %d unfinished output(s) left by stopped or killed runs: %s", len(removed),
                    ", ".join(str(p) for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    return removed


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
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=temp_prefix(self.path.name),
                                         suffix=TEMP_SUFFIX)
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
        if self._tmp is not None:
            discard(self._tmp, self.path, self.written, self.shape[0])
            self._tmp = None



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
        self._tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=temp_prefix(self.path.name),
                                          suffix=TEMP_SUFFIX))
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
                old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=temp_prefix(f"{self.path.name}.old"),
                                            suffix=TEMP_SUFFIX))
                os.replace(self.path, old / self.path.name)
            os.replace(self._tmp, self.path)
        except BaseException:
            if old is not None and not self.path.exists():
                with contextlib.suppress(OSError):
                    os.replace(old / self.path.name, self.path)  # put the previous folder back
            self.abort()
            raise
        finally:
            if old is not None:  # the previous folder: trash, deleted in the background when large
                discard(old, unfinished=False)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished folder: renamed to trash at once, deleted now or in the background (:func:`discard`)."""
        if self._tmp is not None and (self._tmp.exists() or self._tmp.is_symlink()):
            discard(self._tmp, self.path, self.written, self.shape[0])



# ----------------------------------------------------------------------------- checkpoints
# Loading and saving checkpoints lives in gencli.checkpoints (the safe loader, the allow-list check,
# crash-safe saves); these names stay importable from here, looked up when first asked for, since
# gencli.checkpoints itself writes its files through this module.
def __getattr__(name: str) -> Any:
    if name in ("load_checkpoint", "restore_model"):
        from gencli import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
