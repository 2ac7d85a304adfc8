"""What the three jobs share: turning errors into one-paragraph messages, devices, data, options."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gencli.errors import ConfigError, GencliError


def user_error(err: BaseException) -> GencliError | None:
    """The GencliError behind ``err`` (Hydra's instantiate wraps them), or one made from a config error."""
    seen = err
    while seen is not None:
        if isinstance(seen, GencliError):
            return seen
        seen = seen.__cause__ or seen.__context__
    from hydra.errors import HydraException, InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    first = " ".join(str(err).split())[:600]
    if isinstance(err, InstantiationException):
        return ConfigError(f"the config could not be instantiated: {first}. Check the keys you overrode "
                           "against 'gencli <verb> --cfg job'.")
    if isinstance(err, OmegaConfBaseException | HydraException):
        return ConfigError(f"config error: {first}. See 'gencli <verb> --cfg job' for the keys and their values.")
    if isinstance(err, MisconfigurationException):
        return ConfigError(f"Lightning rejected the trainer settings: {first}. On a machine without a GPU use "
                           "trainer=cpu (or trainer=ddp_cpu for two CPU processes).")
    return None


def run_job(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``job``; print a user error as one paragraph and exit 2 (usage) or 1 (runtime)."""
    from gencli.hardware import keep_freed_memory

    keep_freed_memory()  # large CPU batches: reuse freed memory instead of page-faulting it in again
    try:
        return job(cfg)
    except Exception as err:
        gencli_error = user_error(err)
        if gencli_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]gencli error:[/] {gencli_error.message}", highlight=False)
        sys.exit(gencli_error.exit_code)


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
        # The sample/eval configs have no hardware group: loading here is single-process.
        with open_dict(cfg):
            cfg.data.update(batch_size=batch_size, num_workers=0, pin_memory=False)
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        data_cfg = dict(checkpoint["gencli"]["config"]["data"])
        data_cfg.update(batch_size=batch_size, num_workers=0, pin_memory=False)
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
    for key in ("use_ema", "truncation", "sampler"):
        value = cfg.get(key)
        if value is None:
            continue
        if key not in model.supported_sample_options:
            raise ConfigError(
                f"{key}={value if not isinstance(value, DictConfig) else OmegaConf.to_yaml(value).strip()} does not "
                f"apply to a {type(model).__name__}: it supports {', '.join(model.supported_sample_options) or 'no options'}. "
                f"Drop {key}= from the command."
            )
        options[key] = instantiate(value) if isinstance(value, DictConfig) else value
    return options


def generator_for(seed: int) -> torch.Generator:
    """All sampling noise is drawn from a CPU generator: the same seed gives the same images on any device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))
