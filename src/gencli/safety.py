"""What a config read from a file may build: an allow-list of classes, checked before anything is built.

A checkpoint carries the run config that rebuilds its model (``gencli sample/eval ckpt=``, an LDM's
``first_stage_ckpt``, ``gencli train resume=``). Loading the tensors with ``weights_only=True`` keeps
the pickle from running code, but Hydra's ``instantiate`` would call whatever ``_target_`` the config
names: ``builtins.open``, ``os.system``, ``functools.partial`` around either, or any function reachable
as an attribute path (``gencli.io.os.system``). Hydra's own blocklist does not stop that. So every
config that comes from a file goes through :func:`check_config` first: each ``_target_``, at any
depth (nested nets, ``_partial_`` optimisers, schedulers, ``_args_`` lists), must be one of the exact
names in :data:`ALLOWED_TARGETS`, compared as strings, so nothing is imported to decide. Anything else
is refused with exit code 2, naming the key and the target.

The same list bounds what a command line may build (:mod:`gencli.schema` resolves targets through
:func:`resolve_target`), so a run whose checkpoint gencli would refuse is refused before it trains.
A user who extends gencli with a class of their own trusts it explicitly:
``GENCLI_TRUSTED_TARGETS=mypkg.nets.MyUNet,mypkg.data.MyData`` (comma-separated, exact names).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any

from gencli.errors import ConfigError

#: gencli's own configurable classes, by the exact dotted name the configs use.
GENCLI_TARGETS = frozenset({
    # families
    "gencli.families.autoencoder.Autoencoder",
    "gencli.families.vae.VAE",
    "gencli.families.gan.GAN",
    "gencli.families.diffusion.Diffusion",
    "gencli.families.diffusion.LatentDiffusion",
    "gencli.families.classifier.Classifier",
    # nets
    "gencli.nets.conv.ConvEncoder",
    "gencli.nets.conv.ConvDecoder",
    "gencli.nets.dcgan.DCGANGenerator",
    "gencli.nets.dcgan.DCGANDiscriminator",
    "gencli.nets.unet.UNet",
    "gencli.nets.mlp.MLPDenoiser",
    "gencli.nets.classifier.ClassifierNet",
    # diffusion schedule and samplers
    "gencli.diffusion.schedule.NoiseSchedule",
    "gencli.diffusion.samplers.DDPMSampler",
    "gencli.diffusion.samplers.DDIMSampler",
    "gencli.diffusion.samplers.DPMSolverPP2M",
    "gencli.diffusion.samplers.HeunSampler",
    # optimisation
    "gencli.optim.LinearWarmup",
    # data
    "gencli.data.DigitsDataModule",
    "gencli.data.MNISTDataModule",
    "gencli.data.FashionMNISTDataModule",
    "gencli.data.CIFAR10DataModule",
    "gencli.data.FolderDataModule",
    # hardware, callbacks, metrics and feature extractors (command-line configs)
    "gencli.hardware.HardwareSettings",
    "gencli.callbacks.ModelCheckpoint",
    "gencli.callbacks.TrainingProgressBar",
    "gencli.callbacks.LearningRateMonitor",
    "gencli.callbacks.ModelSummary",
    "gencli.callbacks.SampleGrid",
    "gencli.callbacks.NonFiniteGuard",
    "gencli.callbacks.GANMonitor",
    "gencli.callbacks.SampleQuality",
    "gencli.callbacks.Preemption",
    "gencli.callbacks.OptunaPruning",
    "gencli.metrics.sample_metrics.FIDMetric",
    "gencli.metrics.sample_metrics.KIDMetric",
    "gencli.metrics.sample_metrics.ISMetric",
    "gencli.metrics.sample_metrics.PRDCMetric",
    "gencli.metrics.reconstruction.ReconstructionMetrics",
    "gencli.metrics.editing.InpaintingQuality",
    "gencli.metrics.editing.PerceptualPathLength",
    "gencli.metrics.conditional.ClassAccuracy",
    "gencli.metrics.conditional.IntraFID",
    "gencli.metrics.features.DomainFeatures",
    "gencli.metrics.features.InceptionFeatures",
})

#: Library classes the configs use. Optimisers and LR schedules take parameters and numbers only; no
#: class here takes a callable or a path to code (LambdaLR, which takes a function, is left out).
LIBRARY_TARGETS = frozenset({
    *(f"torch.optim.{name}" for name in ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")),
    *(f"torch.optim.lr_scheduler.{name}" for name in (
        "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR",
        "ConstantLR", "PolynomialLR", "OneCycleLR")),
    "lightning.pytorch.Trainer",
    "lightning.pytorch.strategies.DDPStrategy",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    # logger=wandb|mlflow: keyword settings only (names, a directory, a tracking URI); sample/eval never build them
    "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.loggers.MLFlowLogger",
    "lightning.pytorch.callbacks.LearningRateMonitor",
})

#: Hydra's reserved keys, with the values a config from a file may give them.
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
CONVERT_VALUES = ("none", "partial", "object", "all")

TRUST_ENV = "GENCLI_TRUSTED_TARGETS"


def allowed_targets() -> frozenset[str]:
    """The allow-list: gencli's classes, the library classes above, and ``$GENCLI_TRUSTED_TARGETS``."""
    extra = {name.strip() for name in os.environ.get(TRUST_ENV, "").split(",") if name.strip()}
    return GENCLI_TARGETS | LIBRARY_TARGETS | extra


def iter_nodes(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key, value) in a nested dict/list config, depth first, the root as ''."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from iter_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from iter_nodes(value, f"{path}[{i}]")


def check_config(config: Any, source: str) -> None:
    """Refuse a config from a file (``source`` names it: ``ckpt=PATH``) that would build anything outside
    the allow-list, or that holds an interpolation (a stored config is always resolved, so ``${...}`` in
    one means the file was edited by hand, and OmegaConf would evaluate it)."""
    allowed = allowed_targets()
    for where, value in iter_nodes(config):
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{source} is refused: its stored config holds the interpolation {value[:80]!r} at {where or 'the top'}. "
                "gencli stores configs resolved, so this file was edited or not written by 'gencli train'; it is not "
                "loaded, since evaluating it is not safe."
            )
        if not isinstance(value, dict):
            continue
        for key in value:
            if isinstance(key, str) and key.startswith("_") and key.endswith("_") and key not in HYDRA_KEYS:
                raise ConfigError(f"{source} is refused: its stored config has the key {join(where, key)}, which is "
                                  f"not one of Hydra's ({', '.join(sorted(HYDRA_KEYS))}); it was not written by gencli.")
        bad = {key: value[key] for key in ("_partial_", "_recursive_") if key in value and not isinstance(value[key], bool)}
        if "_convert_" in value and value["_convert_"] not in CONVERT_VALUES:
            bad["_convert_"] = value["_convert_"]
        if bad:
            key, given = next(iter(bad.items()))
            raise ConfigError(f"{source} is refused: its stored config sets {join(where, key)}={given!r}, which is not "
                              "a plain true/false (or a Hydra conversion mode); it was not written by gencli.")
        if "_target_" in value:
            target = value["_target_"]
            if not isinstance(target, str) or target not in allowed:
                raise ConfigError(
                    f"{source} is refused: its config would build {join(where, '_target_')}={str(target)[:120]!r}, which is "
                    "not one of gencli's classes or the optimisers and schedules it uses, so it could run code from the "
                    "file. Nothing was built. Only load checkpoints whose origin you trust; a class of your own can be "
                    f"trusted explicitly with {TRUST_ENV}=module.Class."
                )


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def resolve_target(target: str, where: str) -> Any:
    """The class an allow-listed ``_target_`` names (imported only once it is known to be allowed)."""
    if target not in allowed_targets():
        raise ConfigError(
            f"{where}._target_={target} is not one of gencli's classes or the optimisers and schedules it uses, so its "
            "checkpoints could not be loaded by gencli sample/eval. Use a class from the configs in conf/, or trust "
            f"your own explicitly with {TRUST_ENV}={target}."
        )
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{where}._target_={target} cannot be imported ({err}); check the spelling or "
                          f"that its package is installed.") from err
