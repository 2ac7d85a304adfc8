"""The global batch of a run on many devices, and the learning rate that goes with it.

Lightning's ``data.batch_size`` is per process: the same recipe on 8 GPUs trains with 8x the batch of one GPU, and
``trainer.accumulate_grad_batches=k`` multiplies it by k again. The optimisation sees the *global* batch,

    global batch = data.batch_size x trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches

so a recipe's learning rate belongs to its global batch (DDPM's 2e-4 to 128). Two settings keep that right:

- ``data.global_batch_size`` (a recipe's, or the command line's): the per-device batch follows from the devices
  and the accumulation, so the same recipe does the same maths on one GPU, on 8, or on one GPU with
  ``trainer.accumulate_grad_batches=4`` (as NVlabs/edm's ``--batch``). A global batch the devices cannot split
  evenly is refused.
- ``lr_scaling`` (``none`` | ``linear`` | ``sqrt``) with ``lr_reference_batch``: when the global batch differs from the
  batch the learning rate was set for, scale every optimiser's lr by global/reference (linear: Goyal et al. 2017,
  for SGD) or its square root (usual for Adam). ``none`` keeps the configured lr and, when the global batch is not
  the reference, says so in the log.

The train job calls :func:`plan_batch` once the Trainer knows its world size, before ``fit``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

from gencli.errors import ConfigError

log = logging.getLogger(__name__)

LR_RULES = ("none", "linear", "sqrt")
#: the family attributes that hold optimiser factories (functools.partial from ``_partial_: true`` configs)
OPTIMIZER_FACTORIES = ("optimizer_factory", "g_optimizer_factory", "d_optimizer_factory")


@dataclass(frozen=True)
class BatchPlan:
    per_device: int
    world_size: int
    accumulate: int
    lr_factor: float = 1.0
    reference: int | None = None
    rule: str = "none"

    @property
    def global_size(self) -> int:
        return self.per_device * self.world_size * self.accumulate

    def describe(self) -> str:
        parts = f"{self.per_device} per device x {self.world_size} device(s) x {self.accumulate} accumulated"
        return f"global batch {self.global_size} ({parts})"

    def as_dict(self) -> dict[str, Any]:
        return {"global": self.global_size, "per_device": self.per_device, "world_size": self.world_size,
                "accumulate_grad_batches": self.accumulate, "lr_scaling": self.rule,
                "lr_reference_batch": self.reference, "lr_factor": self.lr_factor}


def per_device_batch(global_size: int, world_size: int, accumulate: int) -> int:
    """The per-device batch that makes ``global_size``, or a ConfigError naming the settings that do not divide it."""
    split = world_size * accumulate
    if global_size < split or global_size % split:
        raise ConfigError(
            f"data.global_batch_size={global_size} cannot be split evenly over {world_size} device(s) x "
            f"trainer.accumulate_grad_batches={accumulate} (= {split} equal parts). Use a global batch that is a "
            f"multiple of {split} (e.g. {max(split, global_size // split * split)}), or change trainer.devices or "
            "trainer.accumulate_grad_batches.")
    return global_size // split


def lr_factor(global_size: int, reference: int | None, rule: str) -> float:
    if rule not in LR_RULES:
        raise ConfigError(f"lr_scaling={rule} is not known; use none, linear or sqrt.")
    if rule == "none" or reference is None or global_size == reference:
        return 1.0
    ratio = global_size / reference
    return ratio if rule == "linear" else math.sqrt(ratio)


def plan_batch(global_batch_size: int | None, per_device: int, world_size: int, accumulate: int,
               rule: str = "none", reference: int | None = None) -> BatchPlan:
    """The run's batch: from ``global_batch_size`` when given (else ``per_device`` as configured), and the lr factor
    of ``rule`` against ``reference`` (the batch the lr was set for; None: the configured global batch itself)."""
    if global_batch_size is not None:
        per_device = per_device_batch(int(global_batch_size), world_size, accumulate)
    global_size = per_device * world_size * accumulate
    if rule != "none" and reference is None:
        raise ConfigError(f"lr_scaling={rule} needs lr_reference_batch: the global batch the configured learning rate "
                          f"was set for (this run's global batch is {global_size}).")
    return BatchPlan(per_device, world_size, accumulate, lr_factor(global_size, reference, rule), reference, rule)


def scale_learning_rates(model: Any, factor: float) -> dict[str, tuple[float, float]]:
    """Multiply the lr of each optimiser factory of ``model`` by ``factor``; returns {factory: (old lr, new lr)}."""
    changed = {}
    if factor == 1.0:
        return changed
    for name in OPTIMIZER_FACTORIES:
        factory = getattr(model, name, None)
        if isinstance(factory, functools.partial) and "lr" in factory.keywords:
            old = float(factory.keywords["lr"])
            setattr(model, name, functools.partial(factory.func, *factory.args, **{**factory.keywords, "lr": old * factor}))
            changed[name] = (old, old * factor)
    return changed


def apply_batch_plan(cfg: Any, trainer: Any, datamodule: Any, model: Any) -> BatchPlan:
    """Set the data module's per-device batch and the model's learning rates for this run's devices (the Trainer's
    world size and accumulation), record them in the run config, and log the global batch."""
    from omegaconf import open_dict

    global_size = getattr(datamodule, "global_batch_size", None)  # (ImageDataModule's data.global_batch_size)
    if not isinstance(getattr(datamodule, "batch_size", None), int):
        if cfg.data.get("global_batch_size") is not None or str(cfg.get("lr_scaling", "none")) != "none":
            raise ConfigError(f"data.global_batch_size and lr_scaling need a data module with an integer batch_size; "
                              f"{type(datamodule).__name__} has none. Set them to null / none.")
        return BatchPlan(0, int(trainer.world_size), int(trainer.accumulate_grad_batches))
    given = command_line_batch_size()
    if global_size is not None and given is not None:
        raise ConfigError(
            f"data.batch_size={given} and data.global_batch_size={global_size} both set the batch (a "
            "recipe such as experiment=ddpm_cifar10 sets the global one, and the per-device batch follows from it and "
            "the devices). Give data.global_batch_size=N instead, or data.global_batch_size=null to set the batch per "
            "device with data.batch_size.")
    plan = plan_batch(global_size, int(datamodule.batch_size), int(trainer.world_size),
                      int(trainer.accumulate_grad_batches), str(cfg.get("lr_scaling", "none")),
                      cfg.get("lr_reference_batch"))
    datamodule.batch_size = plan.per_device
    changed = scale_learning_rates(model, plan.lr_factor)
    with open_dict(cfg):
        cfg.data.batch_size = plan.per_device
    if isinstance(getattr(model, "run_config", None), dict):
        model.run_config.setdefault("data", {})["batch_size"] = plan.per_device
        model.run_config["batch"] = plan.as_dict()
    if changed:
        lrs = ", ".join(f"{name.replace('_factory', '')} lr {old:g} -> {new:g}" for name, (old, new) in changed.items())
        log.info("%s; lr_scaling=%s against lr_reference_batch=%d: %s", plan.describe(), plan.rule, plan.reference, lrs)
    elif plan.world_size > 1 or plan.accumulate > 1 or global_size is not None:
        log.info("%s", plan.describe())
    reference = plan.reference
    if plan.rule == "none" and reference is not None and reference != plan.global_size:
        log.warning("%s, but the learning rate was set for a global batch of %d (lr_reference_batch) and "
                    "lr_scaling=none keeps it: set lr_scaling=sqrt (Adam) or linear (SGD) to follow the batch, or "
                    "data.global_batch_size=%d to train with the reference batch.", plan.describe(), reference, reference)
    return plan


def command_line_batch_size() -> str | None:
    """The ``data.batch_size=`` of this Hydra run's command line (None: not given there, or not run by Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except (ValueError, AttributeError):  # composed outside a Hydra run (tests, library use)
        return None
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == "data.batch_size" and "=" in o]
    return given[-1] if given else None
