"""What the jobs share: turning errors (and signals) into one-paragraph messages, devices, data, options."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gencli.errors import ConfigError, GencliError, Interrupted
from gencli.runlock import refused_before_training
from gencli.safety import lies_inside


def user_error(err: BaseException) -> GencliError | None:
    """The GencliError behind ``err`` (Hydra's instantiate wraps them), or one made from a config error."""
    from hydra.errors import HydraException, InstantiationException

    chain, seen = [], err
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for seen in chain:
        if isinstance(seen, GencliError):
            return seen
    # Lightning's own class, looked up only if Lightning is loaded (importing it takes seconds; if it is not
    # loaded, none of its errors can be in the chain)
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    misconfiguration = getattr(exceptions, "MisconfigurationException", None)
    lightning = next((seen for seen in chain if misconfiguration and isinstance(seen, misconfiguration)), None)
    if lightning is not None:
        err = lightning  # the reason, not Hydra's "error in call to target" around it
    first = " ".join(str(err).split())[:600]
    if isinstance(err, InstantiationException):
        return ConfigError(f"the config could not be instantiated: {first}. Check the keys you overrode "
                           "against 'gencli <verb> --cfg job'.")
    if isinstance(err, OmegaConfBaseException | HydraException):
        return ConfigError(f"config error: {first}. See 'gencli <verb> --cfg job' for the keys and their values.")
    if misconfiguration is not None and isinstance(err, misconfiguration):
        return ConfigError(f"Lightning rejected the trainer settings: {first}. On a machine without a GPU use "
                           "trainer=cpu (or trainer=ddp_cpu for two CPU processes).")
    return None


def run_job(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``job``; print a user error as one paragraph and exit 2 (usage) or 1 (runtime).

    Every job leaves a ``job.json`` record (:mod:`gencli.sweep`). In a multirun a failed job does not end the
    sweep: it is recorded, and the job returns NaN (a failed trial to Optuna); the sweep's summary reports it
    and the command exits 1 at the end. A signal (Interrupted) still stops the whole sweep.

    Signals: ``train`` stops at a step boundary after saving a checkpoint (:mod:`gencli.callbacks.preemption`);
    every other verb stops at once (:class:`StopOnSignal`): its unfinished outputs are discarded (renamed to trash,
    deleted at once or in the background, :func:`gencli.io.discard`), one paragraph says which signal and what was
    kept and removed, and it exits 128 + the signal (143 for SIGTERM, 130 for Ctrl+C; a second one exits at once).
    Before the job, the temp files and trash that stopped or killed runs left in the output folder (and in the
    run folders beside it) are removed, never those of a live process (:func:`gencli.io.clean_leftovers`).
    """
    from gencli.hardware import keep_freed_memory
    from gencli.sweep import finished_record, in_multirun

    keep_freed_memory()  # large CPU batches: reuse freed memory instead of page-faulting it in again
    started, multirun = time.perf_counter(), in_multirun()
    verb = str(cfg.get("task_name"))
    stopper = StopOnSignal(verb) if verb not in OWN_SIGNAL_HANDLING else None
    out_dir = cfg.paths.output_dir if cfg.get("paths") and cfg.paths.get("output_dir") else None
    if multirun and (cfg.get("sweep") or {}).get("skip_done") and out_dir:
        done = finished_record(out_dir)
        if done is not None:
            import logging

            logging.getLogger(__name__).info("sweep.skip_done: %s already completed (value %s); skipped", out_dir,
                                             done.get("value"))
            return done.get("value") if done.get("value") is not None else float("nan")
    if out_dir and not launched_rank():
        clean_leftovers_near(out_dir, cfg)
    fresh = not multirun and out_dir is not None and only_bookkeeping(out_dir, cfg)  # made by Hydra for this job
    if stopper is not None:
        stopper.install()
    try:
        from gencli.schema import validate

        # Again inside the job: the CLI checked one job of a multirun; every job (and every DDP rank) checks its own.
        validate(cfg, verb)
        value = job(cfg)
        if stopper is not None:  # (it stays installed: a signal while the process winds down exits at once)
            stopper.finishing = f"after gencli {verb} had finished; its outputs are complete"
        if out_dir and rank_zero():
            record_job(out_dir, "completed", value, seconds=time.perf_counter() - started)
        return value
    except (Exception, Stopped) as err:
        if stopper is not None:  # from here on a signal exits at once: the error is being reported
            stopper.finishing = stopper.finishing or "while the job's error was being reported"
        if isinstance(err, Stopped):
            try:
                gencli_error = stopped_error(err.signum, verb, out_dir, time.perf_counter() - started,
                                             stopper.dropped())
            except Exception:  # noqa: BLE001 - the folder could not be described: the signal is still reported
                gencli_error = Interrupted(f"gencli {verb} stopped by {signal.Signals(err.signum).name}; its "
                                           "unfinished outputs were removed.", signum=err.signum)
        else:
            gencli_error = user_error(err)
        full = os.environ.get("HYDRA_FULL_ERROR") == "1" and not isinstance(err, Stopped)
        first = rank_zero()
        # a run refused before training started leaves an existing run folder as it was (gencli.runlock.Records):
        # Hydra's rewritten .hydra/ and the attempt's files are put back, and no job.json says 'failed'
        put_back = bool(out_dir and first and not multirun and not launched_rank() and gencli_error is not None
                        and not isinstance(gencli_error, Interrupted) and refused_before_training(out_dir))
        if out_dir and first and not put_back:
            status = "interrupted" if isinstance(gencli_error, Interrupted) else "failed"
            reason = gencli_error.message if gencli_error is not None else f"{type(err).__name__}: {err}"
            record_job(out_dir, status, reason=reason, seconds=time.perf_counter() - started,
                       exit_code=gencli_error.exit_code if gencli_error is not None else 1)
        if gencli_error is None or full:
            if multirun and not full and first and not launched_rank():
                import logging

                logging.getLogger(__name__).exception("this job failed; the sweep goes on (see its job.json)")
                return float("nan")
            raise
        release_process_group()
        if launched_rank():
            leave_after_rank_zero(gencli_error)
        if fresh and first and not put_back and not isinstance(gencli_error, Interrupted) and \
                only_bookkeeping(out_dir, cfg):
            import shutil  # failed before it produced anything: leave no empty run folder behind (the error is printed)

            shutil.rmtree(out_dir, ignore_errors=True)
            for parent in list(Path(str(out_dir)).parents)[:2]:  # outputs/<verb>/runs/ too, when nothing else is there
                with contextlib.suppress(OSError):
                    parent.rmdir()
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]gencli error:[/] {gencli_error.message}", highlight=False)
        if multirun and not isinstance(gencli_error, Interrupted):
            return float("nan")  # recorded; the sweep goes on, and its summary exits 1 at the end
        if isinstance(err, Stopped) and not multirun:
            exit_now(gencli_error.exit_code)
        sys.exit(gencli_error.exit_code)


def exit_now(code: int) -> None:
    """Exit without the interpreter's finalisation, which takes seconds once torch is loaded (the stop message and
    job.json are written, the log flushed): a stopped command should be gone as soon as it said why."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- signals outside train
#: Verbs whose job handles signals itself: train finishes the step and saves a checkpoint first
#: (gencli.callbacks.preemption.Preemption, installed when training starts).
OWN_SIGNAL_HANDLING = frozenset({"train"})
#: The signals that stop any other verb: SIGTERM (kill, a scheduler's preemption), SIGINT (Ctrl+C) and SIGUSR1 (a
#: cluster's warning before preemption; train saves on it too).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
#: What each signal usually means, for the message.
SIGNAL_MEANING = {"SIGTERM": "a termination request: kill, or a scheduler preempting the job",
                  "SIGUSR1": "the cluster's warning before preemption", "SIGINT": "Ctrl+C"}
#: Per verb: the file written last, whose presence means the outputs are complete, and what to do next.
STOP_NOTES = {
    "sample": ("sample.json", "Nothing is resumable: the same command makes the same images again (image i depends "
                              "only on seed and i)."),
    "eval": ("metrics.json", "No metric is reported from part of its images: the same command measures again, "
                             "reusing the reference statistics and domain classifiers already cached."),
    "export": ("export.json", "An export already at the destination is untouched; the same command exports again."),
    "report": (None, "A report.html already there is untouched; the same command writes it again."),
}


class Stopped(BaseException):
    """Raised by :class:`StopOnSignal` in the main thread. Not an ``Exception``, so no ``except Exception`` in a job
    or a library swallows it, while every ``with`` and ``finally`` on the way out still runs (the writers of
    :mod:`gencli.io` discard their unfinished outputs). :func:`run_job` turns it into :class:`Interrupted`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


#: The handlers the process had before the first :class:`StopOnSignal` of this CLI call replaced them (the jobs of a
#: multirun each install their own over the previous job's): what :func:`restore_signal_handlers` puts back.
_BEFORE_JOBS: dict[int, Any] = {}


def restore_signal_handlers() -> None:
    """Put back the signal handlers the process had before its jobs installed theirs (``gencli.cli.dispatch`` calls
    it when the job or the sweep is over, so an in-process call leaves no handler behind that would ``os._exit`` the
    caller on its next Ctrl+C)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in list(_BEFORE_JOBS.items()):
        with contextlib.suppress(ValueError, TypeError, OSError):
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    _BEFORE_JOBS.clear()


class StopOnSignal:
    """While a job other than train runs, SIGTERM, SIGINT and SIGUSR1 stop it at once (:class:`Stopped`); a second
    signal, or one that comes once the job has returned or failed (while its end is reported, and while the process
    winds down, which takes seconds once torch is loaded), exits the process at once (128 + signal) with one line on
    stderr. The handlers stay installed after the job (the next job of a multirun installs its own) until the CLI's
    call is over: :func:`restore_signal_handlers` then puts back the ones the process had before its first job (a
    notebook or a test calling ``gencli.cli.main`` keeps its own Ctrl+C). Only the main thread can handle signals."""

    def __init__(self, verb: str):
        self.verb = verb
        self.received: int | None = None
        self.finishing: str | None = None  # set once the job returned or failed: a signal then exits at once
        self.previous: dict[int, Any] = {}
        from gencli.io import DISCARDED

        self._first_dropped = len(DISCARDED)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self.previous[signum] = signal.signal(signum, self.handle)
                _BEFORE_JOBS.setdefault(signum, self.previous[signum])

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None or self.finishing:
            when = ("a second signal" if self.received is not None else self.finishing)
            note = (f"gencli {self.verb}: {name} {'(' + when + ')' if self.received is None else 'again'}: exiting at "
                    "once." + ("" if self.received is None else " Unfinished outputs not yet removed stay as "
                               ".NAME.<pid>@<host>.<random>.tmp or .trash.* files, which the next gencli run in that "
                               "folder removes.") + "\n")
            with contextlib.suppress(OSError):
                os.write(2, note.encode())
            os._exit(128 + int(signum))
        self.received = signum
        import logging

        logging.getLogger(__name__).warning("received %s: stopping, removing unfinished outputs%s", name,
                                            " (Ctrl+C again exits at once)" if signum == signal.SIGINT else "")
        raise Stopped(signum)

    def dropped(self) -> list:
        """What :func:`gencli.io.discard` removed since the job started."""
        from gencli.io import DISCARDED

        return DISCARDED[self._first_dropped:]


def stopped_error(signum: int, verb: str, out_dir, seconds: float, dropped: list) -> Interrupted:
    """One paragraph: which signal stopped ``verb`` after how long, what was removed, what is kept, what next."""
    name = signal.Signals(signum).name
    parts = [f"gencli {verb} stopped by {name} ({SIGNAL_MEANING.get(name, 'a signal')}) after {seconds:.1f} s."]
    removed, pending = [], []
    folder = Path(str(out_dir)) if out_dir else None
    for item in dropped:
        here = folder is not None and item.target.parent.resolve() == folder.resolve()
        what = (item.target.name if here else str(item.target)) + ("/" if item.pending is not None or
                                                                     not item.target.suffix else "")
        if item.written is not None and item.total is not None:
            what += f" ({item.written:,} of {item.total:,} images)"
        removed.append(what)
        if item.pending is not None:
            pending.append(item.pending)
    if removed:
        parts.append(f"Unfinished, removed: {', '.join(removed)}; none of them was renamed into place.")
    if pending:
        parts.append(f"{', '.join(p.name for p in pending)} (trash) is being deleted in the background; the next "
                     "gencli run in that folder deletes whatever is left.")
    marker, advice = STOP_NOTES.get(verb, (None, "Run the same command again."))
    if folder is not None:
        records = {".hydra", f"{verb}.log", "job.json"}
        with contextlib.suppress(OSError):
            kept = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                          if not p.name.startswith(".") and p.name not in records)
            done = marker is not None and (folder / marker).is_file() and \
                (folder / marker).stat().st_mtime >= time.time() - seconds - 1
            if done:
                parts.append(f"It had finished: {marker} was written, and everything in {folder} is complete and "
                             f"kept ({', '.join(kept)}).")
                advice = ""
            else:
                if marker is not None:
                    parts.append(f"{marker} was not written" + (" (the one there is from an earlier run)"
                                                                 if (folder / marker).exists() else "") + ".")
                parts.append(f"Kept in {folder}: {', '.join(kept)} (complete files only; job.json says interrupted)."
                             if kept else f"Nothing else is in {folder} (job.json says interrupted).")
    if advice:
        parts.append(advice)
    return Interrupted(" ".join(parts), signum=signum)


def clean_leftovers_near(out_dir, cfg: DictConfig) -> list[Path]:
    """Remove the temp files and trash that stopped or killed gencli processes left in ``out_dir`` and, when it is a
    run folder under ``paths.log_dir`` (outputs/<verb>/runs/<name>), in the run folders beside it: a new run has a
    new timestamped folder, so leftovers of the last one would otherwise never be seen. Never a live process's."""
    from gencli.io import clean_leftovers

    folder = Path(str(out_dir))
    folders = [folder]
    log_dir = (cfg.get("paths") or {}).get("log_dir")
    try:
        if log_dir and lies_inside(folder.resolve().parent, str(log_dir)):
            parent = folder.resolve().parent
            folders += sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink() and p != folder.resolve())
    except (OSError, ValueError, RuntimeError):
        pass
    try:
        return clean_leftovers(*folders)
    except Exception as err:  # noqa: BLE001 - tidying up is never the job's fate
        import logging

        logging.getLogger(__name__).warning("could not check %s for leftovers of stopped runs (%s: %s)", folder,
                                            type(err).__name__, err)
        return []


def only_bookkeeping(out_dir, cfg: DictConfig) -> bool:
    """Whether ``out_dir`` holds nothing but Hydra's and gencli's records (.hydra/, <verb>.log, job.json): a run
    folder in which the job produced nothing (a folder of an earlier run, with checkpoints or images, never is)."""
    records = {".hydra", f"{cfg.get('task_name')}.log", "job.json", ".gencli.lock"}  # (gencli.runlock's file)
    try:
        return all(entry.name in records for entry in Path(str(out_dir)).iterdir())
    except OSError:
        return False


def record_job(out_dir, status: str, value=None, **fields) -> None:
    """``job.json`` for this job (gencli.sweep); a record that cannot be written is a warning, never the job's fate."""
    from gencli.sweep import write_job_record

    try:
        write_job_record(out_dir, status, value, **fields)
    except Exception as err:  # noqa: BLE001 - the job's own outcome (and its outputs) must stand
        import logging

        logging.getLogger(__name__).warning("could not write %s/job.json (%s: %s); the job itself %s", out_dir,
                                            type(err).__name__, err, status)


def rank_zero() -> bool:
    """Whether this process speaks for the run (writes its records): rank 0 of a DDP run, or the only process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return not launched_rank()


#: Set by a job before Lightning may launch more ranks (they inherit it): the launching process's id.
LAUNCHER_ENV = "GENCLI_LAUNCHER_PID"


@contextlib.contextmanager
def launcher_mark() -> Iterator[None]:
    """While fitting, ranks that Lightning's launcher starts from this process can tell it is their launcher."""
    if launched_rank():  # a launched rank keeps its launcher's id
        yield
        return
    previous = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = previous


def launched_rank() -> bool:
    """True in a rank (LOCAL_RANK 1, 2, ...) that Lightning's DDP launcher started from a gencli process; not under
    torchrun/SLURM, where the scheduler starts every rank, nor in any other child of a process that ran gencli."""
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0") and os.environ.get(LAUNCHER_ENV) == str(os.getppid())


def release_process_group() -> None:
    """Leave DDP's process group before exiting on an error (Lightning keeps it alive after fit): otherwise
    the interpreter's exit waits on it for seconds."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - on the way out, an unclean group is not worth a second error
            pass


def leave_after_rank_zero(err: GencliError, timeout: float = 120.0) -> None:
    """A rank Lightning launched stops with the same error as rank 0 (the errors that stop a run are agreed
    on by all ranks). Rank 0 prints it once; this rank only logs it, and exits after rank 0 has: Lightning's
    launcher SIGKILLs rank 0 when it sees a rank it launched exit with an error, which would cut rank 0 off
    while it writes metrics.json and prints the message."""
    import logging
    import time

    logging.getLogger(__name__).error("stopping with rank 0: %s", err.message)
    parent, deadline = os.getppid(), time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.exit(err.exit_code)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto.")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N.") from err


def datamodule_for(cfg: DictConfig, checkpoint: dict | None, batch_size: int, image_shape: tuple | None = None):
    """The data module a job compares against: ``data=`` from the command line, else the checkpoint's own.

    With ``image_shape`` (the model's), a data set of another shape is refused up front rather than
    failing inside a convolution.
    """
    from hydra.utils import instantiate

    if cfg.get("data") is not None:
        # Loading here is single-process whatever hardware= says: the images are read once, not every epoch.
        with open_dict(cfg):
            cfg.data.update(batch_size=batch_size, num_workers=0, pin_memory=False)
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        from gencli.safety import check_config

        data_cfg = checkpoint["gencli"]["config"].get("data")
        if not isinstance(data_cfg, dict):
            raise ConfigError("the checkpoint's config has no data section; name the data set with data=<name>.")
        check_config(data_cfg, "the checkpoint's data config")
        data_cfg = dict(data_cfg, batch_size=batch_size, num_workers=0, pin_memory=False)
        if data_cfg.get("download"):
            # A checkpoint may come from a stranger: it does not get to make this machine download files into
            # a folder it names. Missing files are reported with where to put them (or pass data=... yourself).
            data_cfg["download"] = False
    datamodule = instantiate(data_cfg)
    if image_shape is not None and tuple(datamodule.image_shape) != tuple(image_shape):
        c, h, _ = image_shape
        raise ConfigError(
            f"data={datamodule.name} gives images of shape {tuple(datamodule.image_shape)} but the checkpoint's model "
            f"works on {tuple(image_shape)}; add data.image_size={h} data.channels={c}, or drop data= to use the "
            "checkpoint's own data set."
        )
    return datamodule


def sample_options(cfg: DictConfig, model) -> dict[str, Any]:
    """Sampling options given on the command line, checked against what the family supports."""
    from hydra.utils import instantiate

    options = {}
    for key in ("use_ema", "truncation", "sampler", "guidance"):
        value = cfg.get(key)
        if value is None:
            continue
        if key not in model.supported_sample_options:
            raise ConfigError(
                f"{key}={value if not isinstance(value, DictConfig) else OmegaConf.to_yaml(value).strip()} does not "
                f"apply to a {type(model).__name__}: it supports {', '.join(model.supported_sample_options) or 'no options'}. "
                f"Drop {key}= from the command."
            )
        if key == "use_ema":  # an export (gencli export) holds one set of weights: use_ema= may not ask for the other
            from gencli.exports import check_use_ema

            check_use_ema(model, value)
        options[key] = instantiate(value) if isinstance(value, DictConfig) else value
    return options


def sampling_settings(cfg: DictConfig, device: torch.device):
    """``(HardwareSettings, profile name)`` that ``gencli sample`` / ``gencli eval`` sample with (``hardware=``; the
    default profile when the config has none). A GPU profile on a CPU device is a warning, as it is for training
    (:meth:`gencli.hardware.HardwareSettings.mismatch`): the run works, slower or with other numbers."""
    import logging

    from hydra.utils import instantiate

    from gencli.hardware import HardwareSettings
    from gencli.safety import check_config
    from gencli.sampling_hardware import mismatch

    node = cfg.get("hardware")
    if node is not None:  # (the command line's, never a checkpoint's; still only an allow-listed class is built)
        check_config(OmegaConf.to_container(node, resolve=True), "hardware=")
    settings = instantiate(node) if node is not None else HardwareSettings()
    profile = hardware_choice()
    warning = mismatch(settings, device, profile)
    if warning:
        logging.getLogger(__name__).warning(warning)
    return settings, profile


def hardware_choice() -> str | None:
    """The hardware= profile Hydra composed (gpu_fast, cpu_fast...), or None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get("hardware")
    except ValueError:  # composed outside a Hydra run (library use)
        return None
