"""The config schema: every value's type and range, checked in one place before anything runs.

Where each part comes from, so that nothing is written twice:

- **Classes** (every node with a ``_target_``): the keys a node may hold and their types are the
  constructor's signature (its parameters, through ``**kwargs`` into base classes, and their type
  annotations); Python's defaults are the library defaults, and the YAML files in ``conf/`` mirror them
  (``tests/unit/test_schema.py`` fails when a base config and a signature disagree). Ranges that a type
  cannot say (``latent_dim >= 1``, ``0 < val_fraction < 1``) are the :data:`RANGES` table below.
- **Job options** (``n``, ``seed``, ``mode``, ``resume``...: the keys of ``conf/train.yaml``,
  ``sample.yaml`` and ``eval.yaml`` outside the groups): their types and ranges are the :data:`JOBS`
  dataclasses below; their defaults and comments are in the YAML files only.

:func:`validate` walks a composed config and raises one :class:`~gencli.errors.ConfigError` for the
first bad value: it names the key, the value given, what is expected and, for a misspelled key, the
nearest valid one. The CLI runs it (with Hydra's composition errors reshaped the same way, see
:func:`gencli.config.precheck`) before Hydra starts the job; each job runs it again on the config it
receives (every job of a multirun, every DDP rank).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal

from gencli.errors import ConfigError
from gencli.safety import iter_nodes, resolve_target


@dataclass(frozen=True)
class Range:
    """Bounds for a number (any of them may be None), the values allowed besides them (``also``: -1 for "no
    limit") and what the value means (``means``), said with every refusal so that a user reads what is wrong
    and what the key is for."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()
    means: str = ""

    def check(self, value: Any, alternatives: tuple[str, ...] = ()) -> str | None:
        """None when ``value`` is inside, else what it must be (``alternatives``: what else the key accepts, such
        as "null" for an optional value, named beside the range)."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None  # the type check reports non-numbers
        if isinstance(value, float) and math.isnan(value):
            return self.explain("a number (not NaN)", alternatives)
        if value in self.also:
            return None
        bounds = ((self.ge, ">= {}", value >= (self.ge or 0)), (self.gt, "> {}", value > (self.gt or 0)),
                  (self.le, "<= {}", value <= (self.le or 0)), (self.lt, "< {}", value < (self.lt or 0)))
        if any(bound is not None and not inside for bound, _, inside in bounds):
            return self.explain(" and ".join(text.format(bound) for bound, text, _ in bounds if bound is not None),
                                alternatives)
        return None

    def explain(self, bounds: str, alternatives: tuple[str, ...] = ()) -> str:
        others = [*(str(v) for v in self.also), *alternatives]
        text = bounds + "".join(f", or {other}" for other in others)
        return f"{text}: {self.means}" if self.means else text


@dataclass(frozen=True)
class OneOf:
    """A value from a fixed set, given as ``module:NAME`` of the constant the class itself checks against (so the
    choices are written once), or as the values."""

    source: str = ""
    values: tuple = ()

    def choices(self) -> tuple:
        if self.values:
            return self.values
        import importlib

        module, _, name = self.source.partition(":")
        found = getattr(importlib.import_module(module), name)
        return tuple(found) if not isinstance(found, dict) else tuple(found)

    def check(self, value: Any) -> str | None:
        choices = self.choices()
        return None if value in choices else f"one of {', '.join(map(str, choices))}"


POSITIVE = Range(ge=1)
NON_NEGATIVE = Range(ge=0)
FRACTION = Range(gt=0, lt=1)
RATE = Range(gt=0)

#: Ranges per class and key (types come from the signatures; a value outside is a ConfigError naming it).
RANGES: dict[str, dict[str, Range]] = {
    "gencli.families.autoencoder.Autoencoder": {"latent_dim": POSITIVE, "noise_std": NON_NEGATIVE,
                                                "loss": OneOf("gencli.families.autoencoder:RECON_LOSSES")},
    "gencli.families.vae.VAE": {"latent_dim": POSITIVE, "beta": NON_NEGATIVE, "kl_warmup_steps": NON_NEGATIVE,
                                "obs_sigma": Range(gt=0), "sigma_momentum": Range(ge=0, lt=1),
                                "likelihood": OneOf("gencli.families.vae:LIKELIHOODS")},
    "gencli.families.gan.GAN": {"latent_dim": POSITIVE, "n_critic": POSITIVE, "gp_lambda": NON_NEGATIVE,
                                "ema_decay": Range(ge=0, lt=1), "loss": OneOf("gencli.families.gan:LOSSES")},
    "gencli.families.diffusion.Diffusion": {"ema_decay": Range(ge=0, lt=1), "grad_clip": Range(gt=0),
                                            "min_snr_gamma": Range(gt=0), "label_dropout": Range(ge=0, lt=1),
                                            "guidance": NON_NEGATIVE,
                                            "prediction": OneOf("gencli.diffusion.schedule:PREDICTIONS")},
    "gencli.families.diffusion.LatentDiffusion": {"ema_decay": Range(ge=0, lt=1), "grad_clip": Range(gt=0),
                                                  "label_dropout": Range(ge=0, lt=1), "guidance": NON_NEGATIVE,
                                                  "prediction": OneOf("gencli.diffusion.schedule:PREDICTIONS")},
    "gencli.families.classifier.Classifier": {"shift": NON_NEGATIVE, "label_smoothing": Range(ge=0, lt=1)},
    "gencli.nets.conv.ConvEncoder": {"out_features": POSITIVE, "base_channels": POSITIVE, "max_channels": POSITIVE,
                                     "bottom_size": POSITIVE},
    "gencli.nets.conv.ConvDecoder": {"in_features": POSITIVE, "base_channels": POSITIVE, "max_channels": POSITIVE,
                                     "bottom_size": POSITIVE},
    "gencli.nets.dcgan.DCGANGenerator": {"latent_dim": POSITIVE, "base_channels": POSITIVE, "max_channels": POSITIVE,
                                         "norm": OneOf("gencli.nets.dcgan:NORMS")},
    "gencli.nets.dcgan.DCGANDiscriminator": {"base_channels": POSITIVE, "max_channels": POSITIVE,
                                             "leaky_slope": NON_NEGATIVE, "norm": OneOf("gencli.nets.dcgan:NORMS")},
    "gencli.nets.unet.UNet": {"ch": POSITIVE, "num_res_blocks": POSITIVE, "dropout": Range(ge=0, lt=1),
                              "norm_groups": POSITIVE},
    "gencli.nets.mlp.MLPDenoiser": {"hidden": POSITIVE, "depth": POSITIVE, "time_dim": POSITIVE,
                                    "dropout": Range(ge=0, lt=1)},
    "gencli.diffusion.schedule.NoiseSchedule": {"timesteps": Range(ge=2), "beta_start": FRACTION, "beta_end": FRACTION,
                                                "cosine_s": NON_NEGATIVE,
                                                "kind": OneOf("gencli.diffusion.schedule:KINDS")},
    "gencli.diffusion.samplers.DDPMSampler": {"steps": POSITIVE, "spacing": OneOf("gencli.diffusion.samplers:SPACINGS"),
                                              "variance": OneOf("gencli.diffusion.samplers:VARIANCES")},
    "gencli.diffusion.samplers.DDIMSampler": {"steps": POSITIVE, "eta": Range(ge=0, le=1),
                                              "spacing": OneOf("gencli.diffusion.samplers:SPACINGS")},
    **{f"gencli.diffusion.samplers.{name}": {"steps": POSITIVE, "spacing": OneOf("gencli.diffusion.samplers:SPACINGS"),
                                             "sigmas": OneOf("gencli.diffusion.samplers:SIGMA_SPACINGS")}
       for name in ("DPMSolverPP2M", "HeunSampler")},
    "gencli.optim.LinearWarmup": {"warmup_steps": NON_NEGATIVE},
    **{f"gencli.data.{name}": {"image_size": Range(ge=4), "batch_size": POSITIVE, "num_workers": NON_NEGATIVE,
                               "val_fraction": FRACTION, "max_images": Range(ge=2), "channels": OneOf(values=(1, 3)),
                               **extra}
       for name, extra in (
           ("DigitsDataModule", {}),
           *((name, {"source_split": OneOf("gencli.data.torchvision_sets:SOURCE_SPLITS")})
             for name in ("MNISTDataModule", "FashionMNISTDataModule", "CIFAR10DataModule")),
           ("FolderDataModule", {"resize": OneOf(values=("center_crop", "resize"))}))},
    "gencli.hardware.HardwareSettings": {"num_workers": NON_NEGATIVE, "precision": OneOf("gencli.hardware:PRECISIONS"),
                                         "matmul_precision": OneOf("gencli.hardware:MATMUL"),
                                         "optimizer_kernel": OneOf("gencli.hardware:OPTIMIZER_KERNELS")},
    "gencli.callbacks.ModelCheckpoint": {"save_top_k": Range(ge=-1), "every_n_steps": NON_NEGATIVE},
    "gencli.callbacks.SampleGrid": {"every_n_steps": NON_NEGATIVE, "n": POSITIVE},
    "gencli.callbacks.GANMonitor": {"every_n_steps": POSITIVE, "n": Range(ge=2), "collapse_ratio": NON_NEGATIVE,
                                    "d_win_fraction": Range(ge=0, le=1), "d_win_checks": POSITIVE},
    "gencli.callbacks.Throughput": {"warmup_steps": Range(ge=0, means="the training batches left out of the "
                                                       "measurement (e.g. 20), or 0 to time them all")},
    "gencli.callbacks.SampleQuality": {"every_n_epochs": NON_NEGATIVE, "n": Range(ge=2), "batch_size": POSITIVE,
                                       "reference_n": Range(ge=2, means="the first n real images of the split; null: "
                                                            "the whole split")},
    # 0 epochs, 0 steps or 0 training batches would train nothing and still end "completed", without a checkpoint
    "lightning.pytorch.Trainer": {"max_epochs": Range(ge=1, also=(-1,), means=(
                                      "the epochs to train (-1: no limit, then max_steps or max_time ends the run; "
                                      "null: Lightning's default, 1000 unless max_steps is set); 0 would train "
                                      "nothing")),
                                  "max_steps": Range(ge=1, also=(-1,), means=(
                                      "the optimiser steps to train (-1: no limit, the default, then max_epochs or "
                                      "max_time ends the run); 0 would train nothing")),
                                  "limit_train_batches": Range(gt=0, means=(
                                      "the training batches per epoch (an integer) or the fraction of them (a number "
                                      "<= 1.0); null: all; 0 would train nothing")),
                                  "min_epochs": NON_NEGATIVE,
                                  "log_every_n_steps": POSITIVE, "accumulate_grad_batches": POSITIVE,
                                  "check_val_every_n_epoch": POSITIVE, "num_sanity_val_steps": Range(ge=-1),
                                  "gradient_clip_val": NON_NEGATIVE, "num_nodes": POSITIVE},
    **{f"torch.optim.{name}": {"lr": RATE, "weight_decay": NON_NEGATIVE, "eps": Range(gt=0)}
       for name in ("Adam", "AdamW", "Adagrad", "Adamax", "NAdam", "RAdam")},
    **{f"torch.optim.{name}": {"lr": RATE, "weight_decay": NON_NEGATIVE, "momentum": NON_NEGATIVE}
       for name in ("SGD", "RMSprop")},
}


# ----------------------------------------------------------------------------- job options
#: A GAN's truncation psi (sample and eval): 0 < psi <= 1.
TRUNCATION = Range(gt=0, le=1, means=("the GAN's truncation psi, which scales the prior's latents (1: as drawn, "
                                      "smaller: more typical images, less variety); null: none"))


@dataclass
class EvalReference:
    """``reference.*`` of gencli eval: a nested mapping whose keys are checked like job options."""

    n: Annotated[int, Range(ge=2, means="the first n real images of the split; null: the whole split")] | None
    cache: bool


@dataclass
class TrainJob:
    task_name: str
    run_name: str | None
    seed: int
    optimized_metric: str | None
    resume: str | None
    sweep: dict
    lr_scaling: Literal["none", "linear", "sqrt"]
    lr_reference_batch: Annotated[int, POSITIVE] | None


@dataclass
class SampleJob:
    task_name: str
    run_name: str | None
    ckpt: str | None
    mode: Literal["grid", "interpolate", "reconstruct", "inpaint", "variation"]
    n: Annotated[int, POSITIVE]
    batch_size: Annotated[int, POSITIVE]
    seed: int
    nrow: Annotated[int, Range(ge=1, means="the images per row of the PNG grid (null: a square grid)")] | None
    interpolation_steps: Annotated[int, Range(ge=2)]
    device: str
    use_ema: bool | None
    truncation: Annotated[float, TRUNCATION] | None
    format: Literal["npz", "png", "both"]
    grid_n: Annotated[int, NON_NEGATIVE]
    input: str
    mask: str
    inpaint: dict
    strength: Annotated[float, Range(gt=0, le=1)]
    labels: int | str | list[int | str] | None
    guidance: Annotated[float, NON_NEGATIVE] | None


@dataclass
class EvalJob:
    task_name: str
    run_name: str | None
    ckpt: str | None
    samples: str | None
    ref: str | None
    split: Literal["train", "val"]
    n: Annotated[int, Range(ge=0, means=(
        "how many images: generated from ckpt= (at least 2), the first n of samples= files, or the real images of "
        "metric=recon; 0 takes all of samples= (recon: the whole split)"))]
    batch_size: Annotated[int, POSITIVE]
    seed: int
    device: str
    use_ema: bool | None
    truncation: Annotated[float, TRUNCATION] | None
    save_samples: bool
    reference: EvalReference
    labels: int | str | list[int | str] | None
    guidance: Annotated[float, NON_NEGATIVE] | None


@dataclass
class ExportJob:
    task_name: str
    run_name: str | None
    ckpt: str | None
    format: Literal["safetensors", "diffusers"]
    out: str | None
    use_ema: bool | None
    overwrite: bool


@dataclass
class ReportJob:
    task_name: str
    run_name: str | None
    path: str | None
    out: str | None
    rank_by: str | None
    direction: Literal["minimize", "maximize"] | None
    max_grids: Annotated[int, POSITIVE]
    related: list[str] | None


JOBS: dict[str, type] = {"train": TrainJob, "sample": SampleJob, "eval": EvalJob, "export": ExportJob,
                         "report": ReportJob}
#: Top-level keys that are config groups (checked as nodes, not as job options).
GROUP_KEYS = {"model", "data", "trainer", "hardware", "logger", "callbacks", "paths", "sampler", "metric", "features",
              "experiment", "hparams_search", "hydra"}


def job_fields(job: str) -> dict[str, Any]:
    schema = JOBS[job]
    hints = typing.get_type_hints(schema, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


# ----------------------------------------------------------------------------- checking
def validate(cfg: Any, job: str) -> None:
    """Raise ConfigError for the first value of a composed config (DictConfig or dict) that is wrong."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        try:
            job_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])  # Hydra's own settings aside
            plain = OmegaConf.to_container(job_cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{interpolation_problem(err)} See 'gencli {job} --cfg job' for the keys and their "
                              "values.") from err
    else:
        plain = cfg
    plain = {k: v for k, v in plain.items() if k != "hydra"}
    if job in JOBS:
        check_job_options(plain, job)
    # hardware first: trainer.precision and the loaders' workers interpolate it, and hardware.* is what users set
    nodes = [(where, node) for where, node in iter_nodes(plain)
             if isinstance(node, dict) and isinstance(node.get("_target_"), str)]
    for where, node in sorted(nodes, key=lambda item: not item[0].startswith("hardware")):
        check_node(where, node)


def interpolation_problem(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    text = " ".join(str(err).split("\n")[0].split())
    return f"{key} could not be resolved ({text})." if key else f"the config could not be resolved ({text})."


def check_job_options(plain: dict, job: str) -> None:
    fields = job_fields(job)
    for key, value in plain.items():
        if key in GROUP_KEYS:
            continue
        if key not in fields:
            raise unknown_key(key, value, [*fields, *sorted(GROUP_KEYS - {"hydra"})], f"gencli {job}",
                              f"conf/{job}.yaml")
        check_option(key, value, fields[key], job)


def check_option(key: str, value: Any, annotation: Any, job: str) -> None:
    """One job option; a nested mapping described by a dataclass (``reference``) key by key."""
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        inner = typing.get_type_hints(annotation, include_extras=True)
        for sub, sub_value in value.items():
            if sub not in inner:
                raise unknown_key(f"{key}.{sub}", sub_value, list(inner), f"gencli {job}'s {key}", f"conf/{job}.yaml")
            check_option(f"{key}.{sub}", sub_value, inner[sub], job)
        return
    problem = "a mapping" if dataclasses.is_dataclass(annotation) else type_problem(value, annotation)
    if problem:
        raise ConfigError(f"{key}={show(value)} is not valid: {key} must be {problem} (gencli {job}; see "
                          f"conf/{job}.yaml).")


def check_node(where: str, node: dict) -> None:
    target = node["_target_"]
    cls = resolve_target(target, where or "the config")
    from gencli.loggers import missing_package  # logger=wandb|mlflow without their optional package

    if fix := missing_package(target):
        raise ConfigError(fix)
    params, open_kwargs = parameters(cls)
    ranges = RANGES.get(target, {})
    partial = bool(node.get("_partial_"))
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_"):
            continue
        full = f"{where}.{key}" if where else key
        if key not in params:
            if open_kwargs:
                continue
            raise unknown_key(full, value, [k for k in params if not k.startswith("_")], target.rsplit(".", 1)[-1],
                              target)
        annotation = params[key]
        if isinstance(value, dict) and "_target_" in value:
            continue  # a nested object: checked as its own node
        problem = type_problem(value, annotation)
        if problem and value is None:
            raise ConfigError(f"{full} is required here (it is null): set {full}=... ({problem}; "
                              f"{target.rsplit('.', 1)[-1]}'s {key}).")
        if problem is None and key in ranges:
            optional = ("null",) if value is not None and type_problem(None, annotation) is None else ()
            check = ranges[key]
            problem = check.check(value, optional) if isinstance(check, Range) else check.check(value)
        if problem:
            raise ConfigError(f"{full}={show(value)} is not valid: it must be {problem} ({target.rsplit('.', 1)[-1]}'s "
                              f"{key}; see 'gencli <verb> --cfg job').")
    del partial  # a _partial_ node may leave required arguments out: nothing more to check


def parameters(cls: type) -> tuple[dict[str, Any], bool]:
    """{name: annotation} of what ``cls(...)`` accepts, following ``**kwargs`` into base classes; and
    whether it still accepts any keyword at the end of that chain."""
    params: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            return params, True
        try:
            hints = typing.get_type_hints(init, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable annotations: keep the names, skip the types
            hints = {}
        forwards = False
        for name, param in list(signature.parameters.items())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                params.setdefault(name, hints.get(name, Any))
        if not forwards:
            return params, False
        if not klass.__module__.startswith("gencli."):
            return params, True  # a library class keeps **kwargs for its own use (DDPStrategy -> DDP): open
    return params, True


def type_problem(value: Any, annotation: Any) -> str | None:
    """None when ``value`` fits ``annotation`` (or the annotation says nothing checkable), else what it must be."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, *extras = args
        problem = type_problem(value, base)
        if problem:
            return problem
        for extra in extras:
            if isinstance(extra, Range) and (problem := extra.check(value)):
                return problem
        return None
    if annotation is Any or annotation is inspect.Parameter.empty or isinstance(annotation, str | typing.TypeVar):
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(value, arm) for arm in args]
        if any(p is None for p in problems):
            return None
        for arm in args:  # the value has an arm's type but not its range: say the range, not "a number or null"
            if typing.get_origin(arm) is Annotated and type_problem(value, typing.get_args(arm)[0]) is None:
                others = tuple(dict.fromkeys(describe_type(a) for a in args if a is not arm))
                for extra in typing.get_args(arm)[1:]:
                    if isinstance(extra, Range) and (problem := extra.check(value, others)):
                        return problem
        names = [describe_type(arm) for arm in args]
        return " or ".join(dict.fromkeys(names))
    if origin is Literal:
        return None if value in args else f"one of {', '.join(map(str, args))}"
    if annotation is type(None):
        return None if value is None else "null"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"a list ({describe_type(annotation)})"
        inner = [a for a in args if a is not Ellipsis]
        if len(inner) == 1:
            for index, item in enumerate(value):
                if problem := type_problem(item, inner[0]):
                    return f"a list whose every item is {problem} (item {index} is {show(item)})"
        elif len(inner) > 1:  # a fixed-length tuple: (beta1, beta2)
            expected = f"a list of {len(inner)}: {', '.join(describe_type(a) for a in inner)}"
            if len(value) != len(inner) or any(type_problem(v, a) for v, a in zip(value, inner)):
                return expected
        return None
    if origin is dict or annotation is dict:
        return None if isinstance(value, dict) else "a mapping"
    if isinstance(annotation, type) and origin is None:
        # An object (nn.Module, Tensor, Strategy): a config gives it as a nested node (a mapping), never as a plain
        # value, except paths, which a string stands for.
        if isinstance(value, annotation | dict):
            return None
        if isinstance(value, str) and issubclass(annotation, os.PathLike | PurePath):
            return None
        return f"a {annotation.__name__}"
    return None  # callables, protocols and other annotations that say nothing checkable here


def describe_type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return describe_type(args[0])
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return f"one of {', '.join(map(str, args))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)).replace("typing.", ""))


def show(value: Any) -> str:
    return "null" if value is None else str(value) if not isinstance(value, str) else (value or "''")


def unknown_key(key: str, value: Any, valid: list[str], owner: str, where: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" Did you mean {prefix}{close[0]}?" if close else ""
    return ConfigError(f"{key}={show(value)}: {owner} has no option {leaf!r}.{hint} Its options are "
                       f"{', '.join(sorted(valid)[:40])} ({where}).")


def suggest_key(key: str, cfg: Any) -> str:
    """' Did you mean X?' for a dotted key that does not exist in the composed ``cfg``, or ''."""
    from omegaconf import DictConfig

    parts = key.split(".")
    node, known = cfg, []
    for part in parts[:-1]:
        if isinstance(node, DictConfig | dict) and part in node:
            node, known = node[part], [*known, part]
            continue
        break
    depth = len(known)
    wanted = parts[depth]
    if not isinstance(node, DictConfig | dict):
        return ""
    options = [str(k) for k in node.keys()]
    close = difflib.get_close_matches(wanted, options, n=1, cutoff=0.6)
    if not close:
        return f" {'.'.join(known) or 'The config'} has {', '.join(sorted(options)[:30])}."
    fixed = ".".join([*known, close[0], *parts[depth + 1:]])
    return f" Did you mean {fixed}?"
