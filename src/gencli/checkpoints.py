"""Checkpoints in and out: the one safe loader, the model rebuilt from a checkpoint, crash-safe saving.

Reading (every path a user gives: ``ckpt=``, ``resume=``, ``model.first_stage_ckpt=``, ``features.ckpt=``,
and Lightning's own resume):

- local files only (a URL is refused: download it yourself, and only if you trust it);
- ``torch.load(weights_only=True)``, so the pickle cannot run code;
- the checkpoint's format version is checked (:data:`CHECKPOINT_FORMAT`);
- its stored config passes :func:`gencli.safety.check_config` before anything is built from it.

(Lightning reads and writes checkpoints through :class:`gencli.checkpoint_io.SafeCheckpointIO`, which calls
these functions; it lives apart so that sample and eval, which never train, do not import Lightning.)

Writing (:func:`atomic_save`): the bytes go into an
anonymous file in the destination folder (Linux ``O_TMPFILE``), which has no name until it is complete
and fsynced and disappears with the process if it is killed; it is then linked under a temporary name
and renamed over the final one. So a checkpoint name always holds a complete file (the previous one
stays intact when a save fails, e.g. on a full disk), and no partial file outlives the process that
wrote it. Where ``O_TMPFILE`` is not supported the temporary file is named ``.<name>.<pid>.partial`` and
the next run removes those whose process is gone (:func:`remove_stale_partials`).

Removing (:class:`CheckpointFolder`): Lightning removes a run's previous ``last`` / k-th best checkpoint by the
path its callback holds, which on resume comes from the checkpoint file. gencli removes a file only if its real
path lies in the run's own checkpoints folder, it has gencli's checkpoint naming, and the folder's record
(:data:`WRITTEN_RECORD`) says this run or the run it continues wrote it; anything else stays, with a warning.
A save that fails (e.g. a full disk) says what there is to continue from (:func:`save_failure`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gencli.errors import ConfigError, GencliError, RuntimeFailure
from gencli.io import atomic_write, clean_leftovers, process_alive
from gencli.safety import check_config, lies_inside

log = logging.getLogger(__name__)

#: Version of what gencli writes into a checkpoint (the ``gencli`` record: config, image shape,
#: family, and the training state gencli adds). Checkpoints from before versions were written are 1.
CHECKPOINT_FORMAT = 1
PARTIAL_SUFFIX = ".partial"


# ----------------------------------------------------------------------------- reading
def checkpoint_path(path: str | os.PathLike, key: str = "ckpt") -> Path:
    """``path`` as a local file that exists, or a ConfigError naming ``key=path``."""
    text = str(path)
    if "://" in text:
        raise ConfigError(
            f"{key}={text} is a URL; gencli reads checkpoints from local files only. Download it yourself (only if "
            f"you trust its origin) and give the local path, e.g. {key}=./model.ckpt."
        )
    resolved = Path(text).expanduser()
    if not resolved.exists():
        raise ConfigError(
            f"{key}={resolved} does not exist. Give the path of a checkpoint written by 'gencli train', "
            "e.g. outputs/train/runs/<date>/checkpoints/last.ckpt (each train run prints it)."
        )
    if resolved.is_dir():
        candidates = sorted(resolved.rglob("last.ckpt"))
        hint = f" such as {key}={candidates[0]}" if candidates else ""
        raise ConfigError(f"{key}={resolved} is a directory, not a checkpoint file; give a .ckpt file{hint}.")
    return resolved


def load_checkpoint(path: str | os.PathLike, key: str = "ckpt") -> dict[str, Any]:
    """Load a gencli checkpoint with ``weights_only=True`` (no arbitrary pickles) and check what it holds."""
    path = checkpoint_path(path, key)
    from gencli.exports import is_export, read_export

    if is_export(path):  # a .safetensors + .json pair from 'gencli export': the same checks below
        checkpoint = read_export(path, key)
        check_format(checkpoint["gencli"].get("format", 1), f"{key}={path}", checkpoint["gencli"].get("version"))
        check_config(checkpoint["gencli"]["config"], f"{key}={path}")
        return checkpoint
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, EOF, IndexError on text...: all mean "not a checkpoint"
        # torch words it "Unsupported global: GLOBAL x" or "Trying to load unsupported GLOBAL x whose module ..."
        unsafe = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if unsafe:
            raise ConfigError(
                f"{key}={path} holds pickled Python objects besides tensors and plain data "
                f"({unsafe[0].split('WeightsUnpickler error: ')[-1][:160]}), so gencli will not load it: "
                "loading with weights_only=True is what keeps a downloaded checkpoint from running code. "
                "Give a .ckpt written by 'gencli train'."
            ) from err
        raise ConfigError(
            f"{key}={path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else 'unreadable'}). Give a .ckpt written by "
            "'gencli train'; a truncated file usually means it was copied or downloaded incompletely, so use the "
            "run's other checkpoint (last.ckpt or best-*.ckpt) or copy it again."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(
            f"{key}={path} loads, but holds no model state_dict, so it is not a Lightning checkpoint. "
            "Give a .ckpt written by 'gencli train'."
        )
    meta = checkpoint.get("gencli")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not meta["config"]:
        raise ConfigError(
            f"{key}={path} is a Lightning checkpoint but was not written by 'gencli train' (it carries no "
            "gencli config), so the model cannot be rebuilt from it. Train with gencli, or load it in Python."
        )
    check_format(meta.get("format", 1), f"{key}={path}", meta.get("version"))
    check_config(meta["config"], f"{key}={path}")
    return checkpoint


def check_format(found: Any, source: str, version: Any = None) -> None:
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ConfigError(f"{source} has the checkpoint format {found!r}, which is not a format gencli writes; "
                          "the file was edited or not written by 'gencli train'.")
    if found > CHECKPOINT_FORMAT:
        from gencli import __version__

        raise ConfigError(
            f"{source} was written by a newer gencli ({version or 'unknown version'}, checkpoint format {found}); "
            f"this gencli {__version__} reads formats up to {CHECKPOINT_FORMAT}. Upgrade gencli to load it."
        )


def restore_model(path: str | os.PathLike, key: str = "ckpt"):
    """Rebuild the model a checkpoint was trained with, from the config it carries, and load its weights.

    Returns (model in eval mode on CPU, checkpoint dict). Nothing but the checkpoint is needed.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    checkpoint = load_checkpoint(path, key)
    config = OmegaConf.create(checkpoint["gencli"]["config"])
    if "model" not in config:
        raise ConfigError(f"{key}={path} carries a config without a model section; it was not written by 'gencli train'.")
    try:
        model = instantiate(config.model)
    except Exception as err:
        from gencli.jobs.common import user_error

        shaped = user_error(err)
        if shaped is None:
            raise
        raise type(shaped)(f"{key}={path}: its stored config does not build a model with this gencli: {shaped.message}") from err
    from gencli.exports import expand_state, finish_restore

    exported = "export" in checkpoint  # weights from 'gencli export': one set where the model may keep two (EMA)
    try:
        missing, unexpected = model.load_state_dict(expand_state(checkpoint) if exported else checkpoint["state_dict"],
                                                    strict=False)
    except RuntimeError as err:  # a tensor of another shape than the config's model has
        raise ConfigError(
            f"{key}={path} does not fit the model its own config builds: "
            f"{' '.join(str(err).split())[:300]}. The weights were edited or come from another model; use the "
            "file as 'gencli train' (or 'gencli export') wrote it."
        ) from err
    if missing or unexpected:
        raise ConfigError(
            f"{key}={path} does not match the model its own config builds (missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}): it was probably written by an incompatible gencli version "
            f"({checkpoint['gencli'].get('version')})."
        )
    if exported:
        finish_restore(model, checkpoint)
    model.run_config = checkpoint["gencli"]["config"]
    return model.eval(), checkpoint


# ----------------------------------------------------------------------------- writing
#: Test hooks (tests/e2e/test_kill_resume.py sets them in the gencli subprocess, to kill it in the
#: middle of a save or to fail one as a full disk would): called with the destination when a save
#: starts, and with the number of bytes before each write of it.
on_save_start: Callable[[Path], None] | None = None
before_write: Callable[[int], None] | None = None


class _CountingWriter:
    """The file object torch.save writes to: plain writes, with the test hook in front."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, data) -> int:
        if before_write is not None:
            before_write(len(data))
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


#: Per file system (st_dev): can an anonymous file be given a name there? Probed once with an empty file,
#: since some (overlay, gVisor sandboxes) refuse the link with EXDEV, and a copy would need twice the space.
_ANONYMOUS_LINKS: dict[int, bool] = {}


def _anonymous_links_work(folder: Path) -> bool:
    device = folder.stat().st_dev
    if device not in _ANONYMOUS_LINKS:
        works = False
        fd = _open_tmpfile(folder)
        if fd is not None:
            probe = folder / f".gencli-probe.{os.getpid()}{PARTIAL_SUFFIX}"
            try:
                os.link(f"/proc/self/fd/{fd}", probe, follow_symlinks=True)
                os.unlink(probe)
                works = True
            except OSError:
                works = False
            finally:
                os.close(fd)
        _ANONYMOUS_LINKS[device] = works
    return _ANONYMOUS_LINKS[device]


def _open_tmpfile(folder: Path) -> int | None:
    """An unnamed file in ``folder`` (Linux O_TMPFILE), or None where the OS or file system has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o666)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise


def _open_anonymous(folder: Path) -> int | None:
    """An unnamed file in ``folder`` that can be named once complete, or None (then a named partial is used)."""
    return _open_tmpfile(folder) if _anonymous_links_work(folder) else None


def partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` so that ``path`` is never a partial file (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if on_save_start is not None:
        on_save_start(path)
    temp = partial_name(path)
    fd = _open_anonymous(path.parent)
    anonymous = fd is not None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # a dead process of the same pid's partial, or a link put there: never written through
    if fd is None:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb", closefd=False) as raw:
            torch.save(obj, _CountingWriter(raw))
            raw.flush()
            os.fsync(fd)
        if anonymous:
            os.link(f"/proc/self/fd/{fd}", temp, follow_symlinks=True)
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
    return path


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.<pid>.partial`` files in ``folder`` whose writing process no longer exists."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.glob(f".*{PARTIAL_SUFFIX}"):
        pid_text = candidate.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[-1]
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    if removed:
        log.warning("removed %d partial checkpoint file(s) left by a killed run in %s", len(removed), folder)
    clean_leftovers(folder, legacy=False)  # the written-record's temp file (atomic_write) of a killed run
    return removed


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch.save reports a failed write (a full disk) as a RuntimeError from
    its zip writer ('unexpected pos'), raised while the OSError is being handled."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def save_failure(path: Path, err: OSError) -> RuntimeFailure:
    """A failed save as one paragraph: what failed, what there is to continue from (the previous checkpoint,
    intact, or nothing at all when this was the run's first save), and the fix."""
    reason = err.strerror or str(err)
    code = errno.errorcode.get(err.errno or 0, "")
    fix = ("Free space on that disk" if err.errno in (errno.ENOSPC, errno.EDQUOT)
           else "Make that folder writable")
    previous = previous_checkpoints(path.parent)
    if previous:
        kept = (f"Nothing was renamed over the existing checkpoints in {path.parent}, so the last good one is intact "
                f"({previous[0].name}). {fix} (or send runs elsewhere with paths.log_dir=DIR), then continue "
                f"with the same command and resume=auto (or resume={previous[0]}).")
    else:
        kept = (f"No checkpoint had been written in {path.parent} before this one (and no partial file is left), so "
                f"the run has none there to continue from. {fix} (or send runs elsewhere with paths.log_dir=DIR), then "
                "run the same command again: it starts where this run started.")
    return RuntimeFailure(f"could not write the checkpoint {path}: {reason}{f' ({code})' if code else ''}. {kept}")


def previous_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (regular ``*.ckpt`` files) in ``folder``, newest first."""
    found = []
    with contextlib.suppress(OSError):
        for candidate in Path(folder).glob("*.ckpt"):
            with contextlib.suppress(OSError):
                info = candidate.lstat()
                if stat.S_ISREG(info.st_mode):
                    found.append((info.st_mtime, candidate))
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


# ----------------------------------------------------------------------------- removing
#: The record of the checkpoint files a run lineage wrote, kept in its checkpoints folder (see CheckpointFolder).
WRITTEN_RECORD = ".gencli-written.json"
#: A record larger than this was not written by gencli (a name per checkpoint, a few dozen bytes each).
RECORD_LIMIT = 1 << 20


class CheckpointFolder:
    """A run's checkpoints folder and the checkpoint files in it that gencli may remove.

    Lightning removes the "previous" ``last`` and ``k``-th best checkpoints as a run goes on, by the paths
    its ModelCheckpoint holds; on resume those come from the checkpoint file, which may come from a
    stranger. So a file is removed only if all of these hold, whatever path is asked for:

    - its real path (``..`` and every symbolic link resolved) lies inside ``folder``, and the path as given
      passes through no symbolic link (a link in the folder that points elsewhere is never followed);
    - its name relative to the folder has gencli's checkpoint naming (``naming``: the checkpoint callback's
      ``filename`` template and ``last``, see :func:`gencli.callbacks.checkpoint.checkpoint_naming`);
    - it is a regular file;
    - it was written by this run or by the run it continues in this folder.

    The last point is known from a small record, :data:`WRITTEN_RECORD` in the folder: the names of the
    checkpoints this lineage saved there and has not removed. Every save through
    :class:`gencli.checkpoint_io.SafeCheckpointIO` adds its name (rewritten atomically), every removal takes it
    out, and a run continuing in the folder (``resume=auto``, or ``resume=PATH`` with the same run folder)
    reads it at set-up. Why a record rather than "whatever gencli-named files are in the folder": a file the
    user put there under a gencli-like name (a copy of another run's best checkpoint, say) was not written by
    this lineage, and a crafted checkpoint could name it. The record is itself checked like any input: a
    regular file (not a link), under :data:`RECORD_LIMIT` bytes, JSON with a list of plain relative names; one
    that is not is ignored with a warning, and then nothing older than this run is removed (files are left
    behind, never lost). A folder without a record (written by a gencli from before it existed) is taken as it
    is at set-up: its gencli-named regular files are the predecessor's, since a run without ``resume=`` refuses
    a folder that holds checkpoints.

    Anything else is left in place with a warning naming the path. Only the process that writes checkpoints
    (rank 0) saves and removes.
    """

    def __init__(self, folder: str | os.PathLike, naming: re.Pattern[str]):
        self.folder = Path(os.path.realpath(os.path.expanduser(str(folder))))
        self.naming = naming
        self.written: set[str] = self._read_record()

    # -- what a path is
    def name_of(self, path: str | os.PathLike, naming: re.Pattern[str] | None = None,
                must_exist: bool = True) -> tuple[str | None, str]:
        """(the checkpoint's name relative to the folder, "") if ``path`` is one of gencli's checkpoints in the
        folder (see the class docstring, the record aside), else (None, why not)."""
        text = str(path)
        if not text or "\x00" in text or "://" in text:
            return None, "it is not a local file path"
        given, real = _resolved(text)
        if not lies_inside(real, self.folder, strictly=True):
            return None, f"it lies outside the run's checkpoints folder {self.folder}"
        if real != given:
            return None, f"it passes through a symbolic link (it resolves to {real})"
        name = Path(real).relative_to(self.folder).as_posix()
        if not (naming or self.naming).fullmatch(name):
            return None, f"its name {name!r} is not one gencli gives checkpoints"
        try:
            info = os.lstat(real)
        except FileNotFoundError:
            return (name, "") if not must_exist else (None, "it does not exist")
        except OSError as err:
            return None, f"it cannot be examined ({err.strerror or err})"
        if not stat.S_ISREG(info.st_mode):
            return None, "it is not a regular file"
        return name, ""

    def refusal(self, path: str | os.PathLike) -> str:
        """Why ``path`` must not be removed, or "" when it may be."""
        return self._removable(path)[1]

    def _removable(self, path: str | os.PathLike) -> tuple[str | None, str]:
        name, why = self.name_of(path, must_exist=False)
        if name is None:
            return None, why
        if name not in self.written:
            return None, (f"neither this run nor the run it continues wrote {name} (it is not in {WRITTEN_RECORD}, the "
                          "record of the checkpoints saved in that folder)")
        return name, ""

    # -- saving and removing
    def record(self, path: str | os.PathLike) -> None:
        """Note the checkpoint just saved at ``path`` (a save outside the folder, or under another naming, is not)."""
        real = _resolved(str(path))[1]
        if not lies_inside(real, self.folder, strictly=True):
            return
        name = Path(real).relative_to(self.folder).as_posix()
        if self.naming.fullmatch(name) and name not in self.written:
            self.written.add(name)
            self._write_record()

    def remove(self, path: str | os.PathLike) -> bool:
        """Remove the checkpoint ``path`` if gencli may (see the class docstring); else leave it with a warning."""
        name, why = self._removable(path)
        if name is None:
            log.warning("left %s in place instead of removing it as an old checkpoint: %s. gencli removes only "
                        "checkpoints it wrote in this run's checkpoints folder.", path, why)
            return False
        try:
            dir_fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError as err:
            log.warning("left %s in place: its folder cannot be opened (%s)", path, err.strerror or err)
            return False
        try:
            os.unlink(name, dir_fd=dir_fd)  # relative to the folder as opened: one swapped for a link is not followed
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not remove the old checkpoint %s (%s); it is left in place", path, err.strerror or err)
            return False
        finally:
            os.close(dir_fd)
        self.written.discard(name)
        self._write_record()
        return True

    # -- the record
    @property
    def record_path(self) -> Path:
        return self.folder / WRITTEN_RECORD

    def _read_record(self) -> set[str]:
        path = self.record_path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return self._present_at_start()
        except OSError as err:  # ELOOP: the record is a symbolic link
            log.warning("ignored %s (%s): it is not the record gencli writes, so no checkpoint from before this run "
                        "will be removed from %s", path, err.strerror or err, self.folder)
            return set()
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > RECORD_LIMIT:
                problem = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"{info.st_size} bytes"
                raise ValueError(problem)
            with os.fdopen(os.dup(fd), "rb") as f:
                data = json.loads(f.read(RECORD_LIMIT + 1).decode("utf-8"))
            names = data.get("written") if isinstance(data, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) and _plain_name(n) for n in names):
                raise ValueError("its 'written' list does not hold plain checkpoint names")
            return set(names)
        except (ValueError, UnicodeDecodeError, OSError) as err:
            log.warning("ignored %s (%s): it is not the record gencli writes, so no checkpoint from before this run "
                        "will be removed from %s", path, err, self.folder)
            return set()
        finally:
            os.close(fd)

    def _present_at_start(self) -> set[str]:
        """The gencli-named regular files in a folder that has no record (see the class docstring)."""
        found: set[str] = set()
        if not self.folder.is_dir():
            return found
        for root, _dirs, files in os.walk(self.folder):  # symbolic links to folders are not followed
            for file in files:
                name, _ = self.name_of(os.path.join(root, file))
                if name is not None:
                    found.add(name)
        if found:
            log.info("%s has no %s (written by an older gencli): its %d gencli-named checkpoint(s) are taken as the "
                     "previous run's", self.folder, WRITTEN_RECORD, len(found))
        return found

    def _write_record(self) -> None:
        if not self.folder.is_dir():
            return
        try:  # a fresh temp name (mkstemp, O_EXCL) renamed over the record: a link at either name is never written through
            with atomic_write(self.record_path, "w") as f:
                json.dump({"format": 1, "written": sorted(self.written)}, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            log.warning("could not update %s (%s): a run continuing this one will leave the checkpoints it does not "
                        "find there in place", self.record_path, err.strerror or err)


def _resolved(text: str) -> tuple[str, str]:
    """(``text`` as an absolute path normalised as text, its real path as the OS resolves it). They differ when a
    symbolic link is on the way: normalising ``a/link/../b`` gives ``a/b``, the OS goes through the link first."""
    path = os.path.expanduser(text)
    joined = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return os.path.normpath(joined), os.path.realpath(joined)


def _plain_name(name: str) -> bool:
    """A relative name with no '..', '.', empty or absolute part: what the record may hold."""
    parts = name.split("/")
    return bool(name) and "\x00" not in name and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


# ----------------------------------------------------------------------------- resuming
def find_resumable(folder: str | os.PathLike) -> tuple[Path | None, dict | None, list[str]]:
    """The newest intact checkpoint in ``folder``: last.ckpt first, then the others newest first.

    Returns (path, loaded checkpoint, one line per checkpoint skipped as unreadable). A checkpoint that
    does not load (truncated, corrupt, not gencli's) is skipped with a warning, never picked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None, None, []
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    skipped = []
    for candidate in [folder / "last.ckpt", *others]:
        if not candidate.is_file():
            continue
        try:
            return candidate, load_checkpoint(candidate, key="resume"), skipped
        except GencliError as err:
            skipped.append(f"{candidate.name}: {err.message}")
            log.warning("resume=auto skips %s: %s", candidate, err.message)
    return None, None, skipped
