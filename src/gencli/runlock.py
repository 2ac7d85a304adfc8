"""A run folder belongs to one run: an exclusive lock on ``<run folder>/.gencli.lock`` for the run's life.

Two ``gencli train`` with the same run folder (a fixed ``run_name=``, ``hydra.run.dir=``, both with
``resume=auto``...) would replace each other's checkpoints and interleave their metrics. So a run holds an
OS lock (``fcntl.flock``) on the folder's lock file while it lives; a second run asking for the folder is
refused in one paragraph naming the holder (pid, host, since when, its command) read from the file.

- The lock belongs to the open file, not to the file's content: the OS drops it when the holding process
  ends, however it ends (an exception, a signal, SIGKILL, an OOM kill). A lock file left by a dead process
  is only a record of the last holder and never blocks. The file is never deleted (deleting a lock file
  lets two processes lock two different files of the same name).
- Taking the lock writes nothing until the run is accepted: :meth:`RunLock.probe` locks an existing lock
  file without touching it (a refused command leaves the folder byte-for-byte as it was), and
  :meth:`RunLock.claim`, once every pre-flight check passed, creates the folder and the file if needed and
  writes the holder's record.
- ``gencli train`` takes it in the pre-flight (:func:`gencli.config.precheck`), before Hydra creates the
  folder or writes ``.hydra/``; a job of a multirun takes its own folder's lock in the job
  (:func:`hold`), and releases it when the job ends (a joblib worker runs further jobs). Ranks that
  Lightning's DDP launcher starts share the run and take no lock; under torchrun/SLURM only global rank 0
  does (:func:`takes_locks`).
- Where the file system cannot lock (some network file systems), the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gencli.errors import ConfigError
from gencli.progress import format_duration

log = logging.getLogger(__name__)

LOCK_NAME = ".gencli.lock"

#: Locks this process holds, by the folder's real path: a job finds the one its pre-flight took.
_HELD: dict[str, RunLock] = {}

#: errno values of a file system that offers no flock (NFS without lockd, Lustre without -o flock, ...).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


def key_of(folder: Path | str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(folder))))


def takes_locks() -> bool:
    """Whether this process speaks for its run: not a rank that Lightning's DDP launcher started (its launcher
    holds the lock), nor a rank other than global rank 0 that torchrun/SLURM/MPI started."""
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
        return False
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name, "")
        if value.strip().isdigit() and int(value) != 0:
            return False
    return True


def holder_record() -> dict:
    """What the lock file says about its holder: this process."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("/gencli", "cli.py")):
        argv[0] = "gencli"
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()), "started": time.time(),
            "command": shlex.join(argv)[:500]}


def read_holder(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(errors="replace")[:4096])
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """The lock of one run folder (see the module's notes)."""

    def __init__(self, folder: Path | str, what: str = "run"):
        self.folder = Path(os.path.abspath(os.path.expanduser(str(folder))))
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.fd: int | None = None
        self.claimed = False
        #: the folder as it was before this run claimed it (an existing folder): put back if the job refuses the
        #: run before training starts (:class:`Records`); None once training started
        self.records: Records | None = None

    # ------------------------------------------------------------------ taking it
    def probe(self) -> bool:
        """Lock the folder's existing lock file without writing anything; False when there is none yet.
        Another live holder: ConfigError naming it."""
        if self.fd is not None:
            return True
        try:
            fd = self._open(0)  # no O_CREAT, no O_TRUNC: the file stays as it is
        except FileNotFoundError:
            return False
        except OSError as err:  # a folder we may not write into: left to the checks that say so
            log.warning("cannot open %s (%s); the run folder is not locked", self.path, err.strerror)
            return False
        return self._lock(fd)

    def claim(self) -> None:
        """Hold the lock (creating the folder and its lock file if needed) and record this process as its holder.
        Called once the run is accepted: from here on the run writes into the folder."""
        if self.fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = self._open(os.O_CREAT)
            except OSError as err:
                log.warning("cannot create %s (%s); the run folder is not locked", self.path, err.strerror)
                return
            self._lock(fd)
        if self.fd is not None and not self.claimed:
            data = (json.dumps(holder_record(), indent=1) + "\n").encode()
            try:
                os.lseek(self.fd, 0, os.SEEK_SET)
                os.write(self.fd, data)
                os.ftruncate(self.fd, len(data))
            except OSError as err:  # a full disk: the lock still holds, only its record is missing
                log.warning("could not record this run in %s (%s)", self.path, err.strerror)
            self.claimed = True
        _HELD[key_of(self.folder)] = self

    def _open(self, extra: int) -> int:
        """Open the lock file itself, never what a symbolic link there points to (writing the holder's record
        through a link would overwrite its target), and only a plain file: a link, a FIFO, a device, a folder or a
        file with other hard links (its content is another name's too) is refused in one paragraph."""
        flags = (os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_NOCTTY", 0) | extra)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO) or os.path.islink(self.path):
                raise self.not_a_lock_file("a symbolic link" if os.path.islink(self.path) else "not a regular file") from None
            raise
        try:
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise self.not_a_lock_file("not a regular file" if not stat.S_ISREG(info.st_mode)
                                       else f"a file with {info.st_nlink} hard links")
        return fd

    def not_a_lock_file(self, what: str) -> ConfigError:
        return ConfigError(
            f"the run folder's lock file {self.path} is {what}, not the plain file gencli writes there: taking the "
            "lock would write this run's record into whatever it leads to, so the run is refused and nothing was "
            f"written. Remove it (rm {shlex.quote(str(self.path))}; gencli creates a new one) and run the command "
            "again, or give this run another folder (another run_name=)."
        )

    def _lock(self, fd: int) -> bool:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no locking
            os.close(fd)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.busy() from None
        except OSError as err:
            os.close(fd)
            if err.errno in _UNSUPPORTED:
                log.warning("the file system of %s cannot lock files (%s): nothing stops a second run from using "
                            "this run folder at the same time", self.folder, err.strerror)
                return False
            raise
        self.fd = fd
        return True

    def busy(self) -> ConfigError:
        """The refusal: one paragraph naming the holder and the fix."""
        holder = read_holder(self.path)
        if holder:
            since = holder.get("since") or "?"
            started = holder.get("started")
            if isinstance(started, int | float):
                since += f", {format_duration(time.time() - started)} ago"
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since {since} "
                   f"({str(holder.get('command', '?'))[:200]})")
        else:
            who = "another gencli process that has just started (it has not recorded itself yet)"
        return ConfigError(
            f"the run folder {self.folder} is in use by another {self.what}: {who}. Two runs in one folder would "
            "replace each other's checkpoints and mix their metrics, so this one is refused and nothing in the folder "
            "was changed. Wait until that run ends (or stop it: it saves and exits on Ctrl+C or SIGTERM) and run this "
            "command again, or give this run its own folder (another run_name=, or drop run_name= / hydra.run.dir=)."
        )

    # ------------------------------------------------------------------ letting go
    def release(self) -> None:
        if _HELD.get(key_of(self.folder)) is self:
            del _HELD[key_of(self.folder)]
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the file drops the lock (the file stays: see the module's notes)
        self.fd, self.claimed = None, False


class Records:
    """An existing run folder as it was before a run claimed it, put back byte-for-byte (with the files' and
    folders' times) when the job refuses the run before training starts (Lightning rejects the trainer settings, a
    model's option is wrong...): Hydra has rewritten ``.hydra/*.yaml`` by then, appended to ``train.log``, and the
    run may have created ``job.json``, ``csv/``..., so without it the folder would describe a run its checkpoints do
    not hold. The small records (``.hydra/*``, ``job.json``, ``metrics.json``, the lock file) are kept in memory;
    ``train.log``, which Hydra only appends to, is cut back to its size; anything the attempt created is removed.
    Taken by the pre-flight (the lock held), so nobody else writes into the folder meanwhile."""

    KEPT = (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "job.json", "metrics.json", LOCK_NAME)
    APPENDED = ("train.log",)
    LIMIT = 4 << 20  # a record larger than this is not one gencli or Hydra wrote: not kept, so not put back

    def __init__(self, folder: Path | str):
        self.folder = Path(os.path.abspath(str(folder)))
        self.entries: dict[str, tuple[bool, int, int]] = {}  # relative path -> (is a folder, atime ns, mtime ns)
        self.kept: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        for root, dirs, files in os.walk(self.folder):
            for name in ["", *dirs, *files] if root == str(self.folder) else [*dirs, *files]:
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    info = path.lstat()
                    rel = path.relative_to(self.folder).as_posix()
                    self.entries[rel] = (stat.S_ISDIR(info.st_mode), info.st_atime_ns, info.st_mtime_ns)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    if rel in self.KEPT and info.st_size <= self.LIMIT:
                        self.kept[rel] = path.read_bytes()
                    elif rel in self.APPENDED:
                        self.sizes[rel] = info.st_size

    def restore(self) -> None:
        """Put the folder back as it was (see the class docstring); what cannot be put back is a warning."""
        for handler in list(logging.getLogger().handlers):  # Hydra's job log into the folder: no line after this
            name = getattr(handler, "baseFilename", None)
            if name and Path(name).parent == self.folder:
                logging.getLogger().removeHandler(handler)
                handler.close()
        problems: list[str] = []
        for root, dirs, files in os.walk(self.folder, topdown=False):  # what the attempt created goes
            for name in [*files, *dirs]:
                path = Path(root) / name
                if path.relative_to(self.folder).as_posix() in self.entries:
                    continue
                try:
                    if path.is_dir() and not path.is_symlink():
                        os.rmdir(path)  # emptied above (bottom-up)
                    else:
                        os.unlink(path)
                except OSError as err:
                    problems.append(f"{path} ({err.strerror})")
        for rel, data in self.kept.items():
            path = self.folder / rel
            try:
                if rel == LOCK_NAME:
                    self._rewrite_in_place(path, data)  # the same file: the lock this process holds stays on it
                else:
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.restore")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.chmod(tmp, stat.S_IMODE(os.lstat(path).st_mode) if os.path.lexists(path) else 0o644)
                    os.replace(tmp, path)
            except OSError as err:
                problems.append(f"{path} ({err.strerror})")
        for rel, size in self.sizes.items():
            try:
                fd = os.open(self.folder / rel, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            except OSError as err:
                problems.append(f"{self.folder / rel} ({err.strerror})")
        for rel, (_, atime, mtime) in sorted(self.entries.items(), key=lambda item: -item[0].count("/")):
            with contextlib.suppress(OSError):  # the times last, deepest first: a folder's changes with its entries
                os.utime(self.folder / rel if rel else self.folder, ns=(atime, mtime), follow_symlinks=False)
        if problems:
            log.warning("could not put the run folder %s back entirely as it was: %s", self.folder,
                        "; ".join(problems[:5]))

    @staticmethod
    def _rewrite_in_place(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.write(fd, data)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def refused_before_training(folder: Path | str) -> bool:
    """The job refused its run before training started: put an existing run folder back as it was before this run
    claimed it (:class:`Records`); True when it did (then no job.json is written for the refusal)."""
    lock = held(folder)
    if lock is None or lock.records is None:
        return False
    records, lock.records = lock.records, None
    if LOCK_NAME not in records.kept:  # this run created the lock file: it goes with the rest
        records.kept.pop(LOCK_NAME, None)
    records.restore()
    return True


def training_starts(folder: Path | str) -> None:
    """From here on the run changes its folder for good (checkpoints, metrics): a refusal no longer puts it back."""
    lock = held(folder)
    if lock is not None:
        lock.records = None


#: Sub-folders of a run folder whose files gencli writes by renaming a finished temp file over the name (never
#: opened in place): a hard link there is harmless (the other name keeps the old content).
RENAMED_INTO = ("checkpoints",)


def check_run_folder(folder: Path | str) -> None:
    """An existing run folder holds only what gencli, Hydra and Lightning can write into without writing outside it:
    the folder itself, and every entry in it (``checkpoints/``, ``.hydra/`` and its YAML files, ``train.log``,
    ``csv/``, ``tensorboard/``, ``samples/``, ``job.json``, ``metrics.json``, the lock...), is no symbolic link, and
    every entry is a folder or a regular file; a file those write in place (all but the checkpoints, which are
    renamed into place) has no other hard link. Otherwise ConfigError, one paragraph naming the path and the fix.
    A crafted folder (``runs/y/checkpoints -> ../x/checkpoints``, ``train.log -> ~/.bashrc``) would otherwise make
    the run resume from and overwrite another run's files without its lock, or append to any file the user may
    write. Checked before anything is written into the folder (by the CLI's pre-flight)."""
    folder = Path(os.path.abspath(os.path.expanduser(str(folder))))
    if not os.path.lexists(folder):
        return
    if os.path.islink(folder):
        raise _linked(folder, folder)
    if not folder.is_dir():
        return  # a file where the folder should be: the output-folder check says so
    for root, dirs, files in os.walk(folder):  # symbolic links to folders are listed in dirs, never entered
        for name in dirs + files:
            path = Path(root) / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode):
                if not _link_inside(path, folder / RENAMED_INTO[0]):
                    raise _linked(path, folder)
                continue
            if stat.S_ISDIR(info.st_mode):
                continue
            inner = path.relative_to(folder).parts
            if not stat.S_ISREG(info.st_mode):
                raise _unsafe(path, folder, "is not a regular file (a FIFO, socket or device)")
            if info.st_nlink > 1 and inner[0] not in RENAMED_INTO:
                raise _unsafe(path, folder, f"has {info.st_nlink} hard links (writing it changes the file of each "
                                            "other name too)")


def _link_inside(path: Path, checkpoints: Path) -> bool:
    """A link Lightning itself makes (``save_last="link"``: ``last.ckpt`` -> a checkpoint beside it): in the
    checkpoints folder, to a regular file in that same folder."""
    if path.parent != checkpoints:
        return False
    real = os.path.realpath(path)
    return os.path.dirname(real) == os.path.realpath(checkpoints) and os.path.isfile(real) and \
        not os.path.islink(real)


def _linked(path: Path, folder: Path) -> ConfigError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    where = "the run folder itself is" if path == folder else f"the run folder {folder} holds"
    return _refusal(path, folder, f"{where} {path}, a symbolic link (to {target}): gencli, Hydra and Lightning would "
                                  "read and write through it, outside this run's folder (another run's checkpoints "
                                  "without its lock, or any file you may write)")


def _unsafe(path: Path, folder: Path, what: str) -> ConfigError:
    return _refusal(path, folder, f"the run folder {folder} holds {path}, which {what}; gencli, Hydra or Lightning "
                                  "would write into it")


def _refusal(path: Path, folder: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{what}, so the run is refused and nothing was written. A run folder that gencli wrote holds no such entry: "
        f"if this folder is yours, remove it (rm {shlex.quote(str(path))}) and run the command again, or train in "
        "another folder (another run_name=)."
    )


def release_all() -> None:
    """Let go of every lock this process holds (the CLI, once its run is over)."""
    for lock in list(_HELD.values()):
        lock.release()


def held(folder: Path | str) -> RunLock | None:
    """The lock this process holds on ``folder``, if any."""
    return _HELD.get(key_of(folder))


@contextlib.contextmanager
def hold(folder: Path | str, what: str = "run") -> Iterator[RunLock | None]:
    """Hold ``folder``'s lock for the block (a job of a multirun); a lock this process already holds (taken by
    the pre-flight) is kept and left as it is; a process that does not speak for its run takes none."""
    lock = held(folder)
    if lock is not None or not takes_locks():
        yield lock
        return
    lock = RunLock(folder, what)
    lock.claim()
    try:
        yield lock
    finally:
        lock.release()
