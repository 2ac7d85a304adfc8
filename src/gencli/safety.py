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
Hydra's own part of the config (``hydra.*``) builds objects too: callbacks, the launcher, the sweeper and its
Optuna sampler and pruner (``_target_``), the logging handlers, formatters and filters (``class``, ``()``,
``ext://`` references). The CLI's pre-flight checks it with :func:`check_hydra_node` against
:data:`HYDRA_TARGETS` and :data:`LOGGING_CLASSES` (what gencli's ``conf/`` and Hydra's defaults and installed
plugins use), and every value of a multirun's sweeps with :func:`check_swept_values`, before Hydra builds any
of it: ``+hydra.callbacks.x._target_=logging.FileHandler`` is refused like ``model._target_=os.system``.
A user who extends gencli with a class of their own trusts it explicitly:
``GENCLI_TRUSTED_TARGETS=mypkg.nets.MyUNet,mypkg.data.MyData`` (comma-separated, exact names).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any

from gencli.errors import ConfigError


def lies_inside(path: str | os.PathLike, folder: str | os.PathLike, *, strictly: bool = False) -> bool:
    """Whether ``path``, once every symbolic link and ``..`` is resolved, lies inside ``folder`` (resolved the same
    way); ``strictly``: and is not ``folder`` itself. A path that cannot be resolved does not. The one check of
    "inside the folder" for every file gencli reads from (reports) or removes in (checkpoints) a folder."""
    try:
        real, base = os.path.realpath(path), os.path.realpath(folder)
        return os.path.commonpath([real, base]) == base and not (strictly and real == base)
    except (OSError, ValueError):
        return False

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
    "gencli.callbacks.Throughput",
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

#: What Hydra's own config (``hydra.*``) may build through ``_target_``: gencli's sweep summary callback, Hydra's
#: basic launcher and sweeper, the installed launcher and sweeper plugins, and the Optuna samplers and pruners
#: that hydra-optuna-sweeper documents. None of them takes a callable or code from its settings.
HYDRA_TARGETS = frozenset({
    "gencli.sweep.SweepSummary",
    "hydra.experimental.callbacks.LogJobReturnCallback",
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.gencli_sweepers.GencliOptunaSweeper",
    "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    *(f"optuna.samplers.{name}" for name in (
        "TPESampler", "RandomSampler", "CmaEsSampler", "GridSampler", "NSGAIISampler", "MOTPESampler")),
    *(f"optuna.pruners.{name}" for name in (
        "MedianPruner", "NopPruner", "PercentilePruner", "SuccessiveHalvingPruner", "HyperbandPruner",
        "ThresholdPruner", "PatientPruner")),
})

#: What Hydra's logging configs (``hydra.job_logging``, ``hydra.hydra_logging``: Python's ``logging.config``
#: dictionaries) may build through ``class`` or ``()``: the standard handlers and formatters Hydra's defaults use.
LOGGING_CLASSES = frozenset({
    "logging.StreamHandler", "logging.FileHandler", "logging.NullHandler", "logging.Formatter", "logging.Filter",
    "logging.handlers.RotatingFileHandler", "logging.handlers.TimedRotatingFileHandler",
    "logging.handlers.WatchedFileHandler",
})

#: The ``ext://`` objects a logging config may refer to (anything else would import the module it names).
LOGGING_EXTERNALS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})

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


# ----------------------------------------------------------------------------- what the command line makes Hydra build
def hydra_refusal(where: str, value: Any, kind: str) -> ConfigError:
    return ConfigError(
        f"{where}={str(value)[:120]} is refused: Hydra would build {str(value)[:120]!r}, which is not one of the "
        f"{kind}, so it could run code or write files gencli never meant to. Nothing was built and nothing written. "
        f"Drop that override (see 'gencli train --cfg hydra' for Hydra's settings); a class of your own can be "
        f"trusted explicitly with {TRUST_ENV}=module.Class."
    )


HYDRA_KIND = ("classes Hydra's part of gencli's config may build (gencli's sweep summary, Hydra's and the installed "
              "plugins' launchers and sweepers, Optuna's samplers and pruners)")
LOGGING_KIND = "logging handlers, formatters and filters Hydra's logging configs use (logging.StreamHandler, ...)"


def check_hydra_node(node: Any, where: str = "hydra") -> None:
    """Refuse a composed ``hydra`` config (a plain dict) that would make Hydra build anything outside
    :data:`HYDRA_TARGETS` (``_target_`` at any depth), :data:`LOGGING_CLASSES` (``class`` / ``()`` in the logging
    configs) or refer to another ``ext://`` object than stdout/stderr; or that names a custom search-space
    function for the Optuna sweeper (a function Hydra would call)."""
    if not isinstance(node, dict):
        return
    trusted = {name.strip() for name in os.environ.get(TRUST_ENV, "").split(",") if name.strip()}
    targets, logging_classes = HYDRA_TARGETS | trusted, LOGGING_CLASSES | trusted
    for path, value in iter_nodes(node, where):
        if isinstance(value, dict):
            logging_part = path.split(".")[1:2] in (["job_logging"], ["hydra_logging"])
            for key, inner in value.items():
                if key == "_target_" and (not isinstance(inner, str) or inner not in targets):
                    raise hydra_refusal(join(path, key), inner, HYDRA_KIND)
                if logging_part and key in ("class", "()") and (not isinstance(inner, str) or inner not in
                                                                  logging_classes):
                    raise hydra_refusal(join(path, key), inner, LOGGING_KIND)
        elif isinstance(value, str) and value.startswith("ext://") and value not in LOGGING_EXTERNALS:
            raise hydra_refusal(path, value, "objects a logging config may refer to (ext://sys.stdout, ext://sys.stderr)")
    search = (node.get("sweeper") or {}).get("custom_search_space") if isinstance(node.get("sweeper"), dict) else None
    if search not in (None, "", "???") and search not in trusted:
        raise hydra_refusal(f"{where}.sweeper.custom_search_space", search,
                            "functions gencli lets a sweeper call (none: give the search space as "
                            "hydra.sweeper.params instead)")


def check_swept_values(overrides: list[str]) -> None:
    """Every value of a multirun's overrides (``hydra.callbacks.x._target_=a,b``, ``model._target_=choice(a,b)``,
    dictionaries included), not only the first one the pre-flight composes, where it names a class."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        if "=" not in text or text.startswith("-"):
            continue
        try:
            override = parser.parse_overrides([text])[0]
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # noqa: BLE001 - interval(...) (numbers only) and what Hydra reports itself
            continue
        key = override.get_key_element().lstrip("+~")
        for value in values:
            check_override_value(key, value)


def check_override_value(key: str, value: Any) -> None:
    """One value given to ``key`` on the command line: a class name at a ``_target_`` (or, under
    ``hydra.*_logging``, ``class`` / ``()``), also inside a dictionary value, must be allowed."""
    if key.startswith("hydra.") or key == "hydra":
        parts = key.split(".")
        node: Any = value
        for part in reversed(parts[1:]):
            node = {part: node}
        check_hydra_node(node if isinstance(node, dict) else {}, "hydra")
        return
    allowed = allowed_targets()
    for where, inner in iter_nodes(value, key):
        if where.rsplit(".", 1)[-1] == "_target_" and isinstance(inner, str) and inner not in allowed:
            raise ConfigError(
                f"{where}={inner[:120]} is not one of gencli's classes or the optimisers and schedules it uses, so it "
                f"could run code; nothing was built. Use a class from the configs in conf/, or trust your own "
                f"explicitly with {TRUST_ENV}={inner[:120]}."
            )
