"""What the three jobs share: turning errors into one-paragraph messages, devices, data, options."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gencli.errors import ConfigError, GencliError, Interrupted


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
    """
    import time

    from gencli.hardware import keep_freed_memory
    from gencli.sweep import finished_record, in_multirun

    keep_freed_memory()  # large CPU batches: reuse freed memory instead of page-faulting it in again
    started, multirun = time.perf_counter(), in_multirun()
    out_dir = cfg.paths.output_dir if cfg.get("paths") and cfg.paths.get("output_dir") else None
    if multirun and (cfg.get("sweep") or {}).get("skip_done") and out_dir:
        done = finished_record(out_dir)
        if done is not None:
            import logging

            logging.getLogger(__name__).info("sweep.skip_done: %s already completed (value %s); skipped", out_dir,
                                             done.get("value"))
            return done.get("value") if done.get("value") is not None else float("nan")
    fresh = not multirun and out_dir is not None and only_bookkeeping(out_dir, cfg)  # made by Hydra for this job
    try:
        from gencli.schema import validate

        # Again inside the job: the CLI checked one job of a multirun; every job (and every DDP rank) checks its own.
        validate(cfg, str(cfg.get("task_name")))
        value = job(cfg)
        if out_dir and rank_zero():
            record_job(out_dir, "completed", value, seconds=time.perf_counter() - started)
        return value
    except Exception as err:
        gencli_error = user_error(err)
        full = os.environ.get("HYDRA_FULL_ERROR") == "1"
        first = rank_zero()
        if out_dir and first:
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
        if fresh and first and not isinstance(gencli_error, Interrupted) and only_bookkeeping(out_dir, cfg):
            import shutil  # failed before it produced anything: leave no empty run folder behind (the error is printed)

            shutil.rmtree(out_dir, ignore_errors=True)
            for parent in list(Path(str(out_dir)).parents)[:2]:  # outputs/<verb>/runs/ too, when nothing else is there
                with contextlib.suppress(OSError):
                    parent.rmdir()
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]gencli error:[/] {gencli_error.message}", highlight=False)
        if multirun and not isinstance(gencli_error, Interrupted):
            return float("nan")  # recorded; the sweep goes on, and its summary exits 1 at the end
        sys.exit(gencli_error.exit_code)


def only_bookkeeping(out_dir, cfg: DictConfig) -> bool:
    """Whether ``out_dir`` holds nothing but Hydra's and gencli's records (.hydra/, <verb>.log, job.json): a run
    folder in which the job produced nothing (a folder of an earlier run, with checkpoints or images, never is)."""
    records = {".hydra", f"{cfg.get('task_name')}.log", "job.json"}
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
