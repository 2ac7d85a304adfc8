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
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gencli.errors import ConfigError, GencliError, RuntimeFailure
from gencli.safety import check_config

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
    if fd is None:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
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
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    if removed:
        log.warning("removed %d partial checkpoint file(s) left by a killed run in %s", len(removed), folder)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """A failed save as one paragraph: what failed, that the previous checkpoints are intact, the fix."""
    reason = err.strerror or str(err)
    code = errno.errorcode.get(err.errno or 0, "")
    fix = ("Free space on that disk" if err.errno in (errno.ENOSPC, errno.EDQUOT)
           else "Make that folder writable")
    return RuntimeFailure(
        f"could not write the checkpoint {path}: {reason}{f' ({code})' if code else ''}. Nothing was renamed over the "
        f"existing checkpoints in {path.parent}, so the last good one is intact. {fix} (or send runs elsewhere with "
        "paths.log_dir=DIR), then continue with the same command and resume=auto (or resume=PATH)."
    )


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
