"""GenerativeModel: the one interface that ``gencli sample`` and ``gencli eval`` rely on.

Every family (autoencoder, VAE, GAN, diffusion) is a LightningModule that subclasses this and
implements :meth:`sample`; families with a latent space also implement :meth:`encode` /
:meth:`decode` (or just :meth:`decode` and :meth:`prior` for decoder-only families like GANs).
The jobs never ask which family they hold: they call these methods and read these attributes.

Conventions: images are float tensors in [-1, 1], NCHW; ``image_shape`` is (C, H, W), fixed at
construction from the data config and saved in the hyper-parameters.

Sampling noise: ``generator`` is a :class:`gencli.seeds.PerImageGenerator` (what the jobs and callbacks
pass: image i's noise depends only on (seed, i), whatever the batch size), a plain ``torch.Generator``
(one stream for the batch) or None (torch's global RNG). Families draw every bit of sampling noise
through :meth:`GenerativeModel.randn` (or the samplers' ``randn``), which handles all three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from gencli.errors import ConfigError
from gencli.seeds import SampleGenerator
from gencli.seeds import randn as draw_randn


class GenerativeModel(L.LightningModule):
    #: True when the family maps images to latents and back (``encode``/``decode``).
    has_encoder: bool = False
    #: True when samples come from decoding a latent drawn from :meth:`prior` (interpolation works).
    has_latent: bool = False
    #: Keyword options :meth:`sample` understands, given at sample/eval time (``use_ema=false``,
    #: ``truncation=0.7``, ``sampler=ddim``); the jobs reject any other with a clear error.
    supported_sample_options: tuple[str, ...] = ()

    def __init__(
        self,
        image_shape: tuple[int, int, int] | list[int],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/loss",
        monitor_mode: str = "min",
        conditional: bool = False,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        #: Class-conditional (``model.conditional=true``): every way of making an image takes ``labels``.
        self.conditional = bool(conditional)
        self.num_classes = int(num_classes) if conditional and num_classes is not None else None
        self.class_names = [str(n) for n in class_names] if conditional and class_names else None
        if self.conditional and (self.num_classes is None or self.num_classes < 2):
            raise ConfigError(
                f"model.conditional=true needs at least 2 classes, and model.num_classes is {num_classes}: it comes from "
                "the data (gencli train fills it in from data=...'s labels). Train on labelled data (mnist, "
                "fashion_mnist, cifar10, digits, or data=folder with one subfolder per class), or set "
                "model.conditional=false."
            )
        # Partials (functools.partial from Hydra's ``_partial_: true``) are kept out of the
        # hyper-parameters: checkpoints must hold only plain data so they load with weights_only.
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        #: The fully resolved run config, set by the train job and saved in every checkpoint so
        #: that ``gencli sample ckpt=...`` rebuilds the model with nothing else.
        self.run_config: dict | None = None

    # ----------------------------------------------------------------- every rank, the same run
    def setup(self, stage: str) -> None:
        """Check the training labels once (:meth:`check_data_labels`), and under DDP that every rank was started
        with the same run config, before any step.

        Ranks that rebuild their config from a command line (Lightning's DDP launcher, a sweep that a
        rank re-ran as a sweep of its own) could train other hyper-parameters while averaging gradients
        with each other, silently. Each rank logs its config's hash; a difference stops the run on every rank.
        """
        trainer = self._trainer
        self.check_data_labels(getattr(trainer, "datamodule", None) if trainer is not None else None)
        if trainer is None or trainer.world_size < 2 or not isinstance(self.run_config, dict):
            return
        import hashlib
        import json
        import logging

        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = {k: v for k, v in self.run_config.items() if k != "hydra"}
        digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()[:16]
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, (digest, mine))
        logging.getLogger(__name__).info("DDP rank %d of %d: run config %s", dist.get_rank(), len(every), digest)
        if any(other != digest for other, _ in every):
            from gencli.errors import RuntimeFailure

            first_digest, first = every[0]  # every rank describes the same differences: each rank against rank 0
            differ = sorted(f"{rank}: {key}" for rank, (other, config) in enumerate(every) if other != first_digest
                            for key in _differing_keys(first, config))
            raise RuntimeFailure(
                f"the {len(every)} DDP ranks of this run were started with different configs (hashes "
                f"{[d for d, _ in every]}; differing keys, by rank: {differ[:10]}): every rank must train the same "
                "model. Start the ranks with the same overrides (under SLURM or torchrun, the same command on "
                "every node); in a sweep, use gencli's own multirun (each job's ranks run that job's overrides)."
            )

    # ----------------------------------------------------------------- step counters without host syncs
    def counter(self, name: str) -> int:
        """The value of the step-counter buffer ``name`` (``ema_updates``, ``d_steps``...), from a host copy: the
        buffer lives on the training device and travels in checkpoints, but reading it (``int(buffer)``) would make
        the CPU wait for the GPU at every step. Read once, then kept in step by :meth:`count_up`."""
        counts = self.__dict__.setdefault("_host_counts", {})
        if name not in counts:
            counts[name] = int(getattr(self, name))
        return counts[name]

    def count_up(self, name: str, skipped: Tensor | None = None) -> int:
        """Add one to the counter buffer ``name`` (on its device, no sync) and to its host copy; returns the new value.
        ``skipped``: the step's found_inf flag (families.ema.skipped_flag): a step skipped on the device is not
        counted in the buffer (the host copy runs ahead then, until the guard stops the run at its next check)."""
        value = self.counter(name) + 1
        getattr(self, name).add_(1 if skipped is None else (1 - skipped).to(getattr(self, name).dtype))
        self._host_counts[name] = value
        return value

    def set_counter(self, name: str, value: int) -> None:
        """Set the counter buffer ``name`` and its host copy (writing the buffer alone would leave the copy behind)."""
        getattr(self, name).fill_(int(value))
        self.__dict__.setdefault("_host_counts", {})[name] = int(value)

    def load_state_dict(self, state_dict, *args: Any, **kwargs: Any):
        # a checkpoint (a resume, sample/eval) brings its own counters: the host copies are read again from the buffers
        self.__dict__.pop("_host_counts", None)
        return super().load_state_dict(state_dict, *args, **kwargs)

    # ----------------------------------------------------------------- the interface
    @torch.no_grad()
    def sample(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None, **options: Any) -> Tensor:
        """Return ``n`` images in [-1, 1], shape (n, *image_shape); a PerImageGenerator must cover ``n`` images.
        ``labels`` (n,): the class of each image, for a conditional model (None: class-balanced, see check_labels)."""
        raise NotImplementedError

    def prior(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None) -> Tensor:
        """Draw ``n`` latents from the family's prior (only where ``has_latent``), of class ``labels`` where the prior
        depends on the class."""
        raise NotImplementedError(f"{type(self).__name__} has no latent prior")

    def encode(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Map images (of class ``labels``, when conditional) to latents (the posterior mean for a VAE)."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder")

    def decode(self, z: Tensor, labels: Tensor | None = None, **options: Any) -> Tensor:
        """Map latents to images in [-1, 1] (of class ``labels``, when conditional)."""
        raise NotImplementedError(f"{type(self).__name__} has no decoder")

    def reconstruct(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Encode and decode ``x`` deterministically (only where ``has_encoder``)."""
        return self.decode(self.encode(x, labels), labels)

    # ----------------------------------------------------------------- editing (gencli sample mode=inpaint|variation)
    #: Keyword options :meth:`inpaint` understands beyond the sample options (``method``, RePaint's jumps).
    inpaint_options: tuple[str, ...] = ()

    def inpaint(self, images: Tensor, mask: Tensor, generator: SampleGenerator = None, labels: Tensor | None = None,
                **options: Any) -> Tensor:
        """Fill ``images`` where ``mask`` (N, 1, H, W) is 0, consistently with where it is 1; the known pixels
        come back unchanged. Images in [-1, 1]."""
        from gencli.errors import ConfigError

        raise ConfigError(f"mode=inpaint needs a family that can take an image in: diffusion, latent diffusion, ae or "
                          f"vae; {type(self).__name__} only generates from noise (inverting a GAN is not built).")

    def vary(self, images: Tensor, strength: float, generator: SampleGenerator = None, labels: Tensor | None = None,
             **options: Any) -> Tensor:
        """A variation of each image; ``strength`` in (0, 1]: 0 would keep the image, 1 ignores it."""
        from gencli.errors import ConfigError

        raise ConfigError(f"mode=variation needs a family that can take an image in: diffusion, latent diffusion, ae "
                          f"or vae; {type(self).__name__} only generates from noise (inverting a GAN is not built).")

    def editing_info(self, mode: str, **options: Any) -> dict[str, Any]:
        """What :meth:`inpaint` / :meth:`vary` did with these options, for sample.json and metrics.json."""
        return {"family": type(self).__name__, "mode": mode}

    def score_batch(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample evaluation terms for a batch of real images, e.g. reconstruction error.

        Returns a dict of 1-D tensors of length ``len(x)``; families without an encoder return {}.
        ``gencli eval metric=recon`` averages them and writes them per sample as anomaly scores.
        """
        return {}

    def score_notes(self) -> list[str]:
        """What a reader must know beside this family's :meth:`score_batch` numbers and validation metrics (e.g. that
        its bits/dim are not the paper-comparable kind); printed under the eval table and kept in metrics.json."""
        return []

    def sampling_info(self, mode: str = "sample", **options: Any) -> dict[str, Any]:
        """What produced the samples, for the provenance in metrics.json (EMA, sampler, steps): of
        :meth:`sample` (``mode="sample"``) or of :meth:`decode` (``mode="decode"``) with these options.
        ``weights`` is "ema" or "raw": which weights made them (families without EMA use their raw weights)."""
        return {"family": type(self).__name__, "weights": "raw"}

    # ----------------------------------------------------------------- class labels
    def check_labels(self, labels: Tensor | None, n: int, generator: SampleGenerator = None) -> Tensor | None:
        """The labels to draw ``n`` images with: None for an unconditional model (which refuses labels), else the
        given ones, checked, or class-balanced ones (image i is class i % K, i from a PerImageGenerator's indices)."""
        from gencli.labels import default_labels

        if not self.conditional:
            if labels is not None:
                raise ConfigError(f"labels were given, but this {type(self).__name__} is unconditional (trained "
                                  "without labels); drop labels=, or train with model.conditional=true.")
            return None
        if labels is None:
            return default_labels(n, self.num_classes, generator, self.device)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).flatten()
        if len(labels) != n:
            raise ConfigError(f"{len(labels)} labels were given for {n} images: give one label per image.")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ConfigError(f"labels must be classes 0..{self.num_classes - 1}; got {labels.unique().tolist()}.")
        return labels

    def batch_labels(self, batch: Any) -> Tensor | None:
        """A training/validation batch's labels for a conditional model (None otherwise); unlabelled images (-1)
        are refused with the fix. Labels that :meth:`check_data_labels` already checked for the whole data set are
        not looked at again: on a GPU each look is a sync that stalls the step."""
        if not self.conditional:
            return None
        labels = batch[1]
        if not getattr(self, "_labels_checked", False):
            self.check_labels_in_range(labels, "a batch holds")
        return labels

    def check_data_labels(self, datamodule: Any) -> None:
        """A conditional model's training and validation labels, all checked at once before the first step (one
        look at the in-memory label tensors of gencli's data modules), so batches need no check of their own."""
        self._labels_checked = False
        if not self.conditional or datamodule is None:
            return
        sets = [getattr(datamodule, name, None) for name in ("train_set", "val_set")]
        labels = [getattr(d, "labels", None) for d in sets]
        if not labels or not all(isinstance(t, Tensor) for t in labels):
            return  # another kind of data module: every batch is checked instead
        for name, t in zip(("training", "validation"), labels):
            if len(t):
                self.check_labels_in_range(t, f"the {name} data holds")
        self._labels_checked = True

    def check_labels_in_range(self, labels: Tensor, where: str) -> None:
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ConfigError(
                f"{where} labels {sorted(set(labels.unique().tolist()))[:8]}, outside this conditional model's classes "
                f"0..{self.num_classes - 1}: the data has unlabelled images (-1: images directly under data.root) or "
                "other classes than the model was built for. Put every image in a class subfolder, or set "
                "model.conditional=false."
            )

    def conditioning_info(self) -> dict[str, Any]:
        """What sampling_info reports about classes (empty for an unconditional model)."""
        if not self.conditional:
            return {}
        return {"conditional": True, "num_classes": self.num_classes,
                **({"class_names": self.class_names} if self.class_names else {})}

    # ----------------------------------------------------------------- shared plumbing
    def randn(self, shape: tuple[int, ...], generator: SampleGenerator) -> Tensor:
        """Gaussian noise drawn on the generator's device, then moved: reproducible on CPU and GPU.

        With a :class:`~gencli.seeds.PerImageGenerator`, row i comes from image i's own stream
        (``shape[0]`` must be its number of images)."""
        return draw_randn(shape, generator, device=self.device)

    def log_step(self, values: dict[str, Any], prog_bar: tuple[str, ...] = ()) -> None:
        """Per-step training scalars, at the logger's cadence: see :func:`log_step`."""
        log_step(self, values, prog_bar)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``trainer.gradient_clip_val``, also with fused optimisers under mixed precision (hardware=gpu_fast), where
        Lightning's own clipping refuses them: see :func:`clip_gradients`."""
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return optimizers_from_factories(self, self.optimizer_factory, self.scheduler_factory, interval="step")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_gencli_checkpoint(self, checkpoint)


def log_step(module: L.LightningModule, values: dict[str, Any], prog_bar: tuple[str, ...] = ()) -> None:
    """Log per-step training scalars at the logger's cadence (``trainer.log_every_n_steps``), as Lightning's own
    LearningRateMonitor does. Lightning writes only those steps' values anyway, but ``self.log`` costs ~1 ms of
    bookkeeping per value even on the steps it drops (it made a DCGAN step on a CPU 22% slower than a plain
    loop: scripts/bench_overhead.py). Names in ``prog_bar`` also show in the progress bar."""
    if not logging_step(module._trainer):
        return
    for name, value in values.items():
        module.log(name, value, prog_bar=name in prog_bar, on_step=True, on_epoch=False)


def clip_gradients(module: L.LightningModule, optimizer, clip_val: float | None, algorithm: str | None = None) -> None:
    """Clip the gradients of ``optimizer``'s parameters to ``clip_val`` (by their global ``norm``, or by ``value``).

    Lightning's ``clip_gradients`` refuses any optimiser that unscales inside its step (torch's fused Adam: the
    ``optimizer_kernel=fused`` of hardware=gpu_fast) under mixed precision, although under bf16 nothing is scaled at
    all. Here: under float16's GradScaler the gradients of such an optimiser are unscaled first (GradScaler then
    steps it without scaling again; an optimiser that does not unscale itself was unscaled by Lightning already),
    then torch's own clipping runs, as Lightning's does."""
    if not clip_val:
        return
    algorithm = str(getattr(algorithm, "value", algorithm or "norm"))
    trainer = module._trainer
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    raw = getattr(optimizer, "optimizer", optimizer)
    if scaler is not None and getattr(raw, "_step_supports_amp_scaling", False):
        scaler.unscale_(raw)
    params = [p for group in raw.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    elif algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        raise ConfigError(f"trainer.gradient_clip_algorithm={algorithm} is not known; use norm or value.")


def logging_step(trainer) -> bool:
    """Whether this training step's scalars are worth logging: the logger writes them (every
    ``log_every_n_steps``), or they are the first, an epoch's last or the run's last, so the progress bar,
    ``callback_metrics`` and metrics.json always hold a recent value, short runs included."""
    connector = getattr(trainer, "_logger_connector", None) if trainer is not None else None
    if connector is None or trainer.sanity_checking or getattr(connector, "should_update_logs", True):
        return True
    loop = trainer.fit_loop.epoch_loop
    last_steps = trainer.max_steps is not None and 0 < trainer.max_steps - trainer.global_step <= len(trainer.optimizers)
    return trainer.global_step == 0 or bool(loop.batch_progress.is_last_batch) or last_steps


def optimizers_from_factories(module: L.LightningModule, optimizer_factory: Callable | None,
                              scheduler_factory: Callable | None, interval: str):
    """Lightning's configure_optimizers from the config's ``_partial_`` optimizer/scheduler (Adam 1e-3 when
    none is configured); frozen parameters (an LDM's first stage) are left out."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(module, optimizer_factory, params, lr=1e-3)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer=optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def build_optimizer(module: L.LightningModule, factory: Callable | None, params: list, **default: Any):
    """``factory(params=...)`` (Adam with ``default`` settings when None), with the update kernel that
    ``hardware.optimizer_kernel`` asks for (``module.optimizer_kernel``, set by HardwareSettings.apply)."""
    import inspect

    factory = factory or functools.partial(torch.optim.Adam, **default)
    kernel = getattr(module, "optimizer_kernel", "auto")
    accepts = inspect.signature(getattr(factory, "func", factory)).parameters
    extra = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}.get(kernel, {})
    return factory(params=params, **{k: v for k, v in extra.items() if k in accepts})


def record_gencli_checkpoint(module: L.LightningModule, checkpoint: dict[str, Any], **extra: Any) -> None:
    """What ``gencli sample/eval ckpt=`` needs to rebuild a module, written into its checkpoint."""
    from gencli import __version__
    from gencli.checkpoints import CHECKPOINT_FORMAT

    trainer = module._trainer
    # Hydra hands constructors OmegaConf containers; turn them into plain lists/dicts so the
    # checkpoint loads with torch.load(weights_only=True).
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = plain(checkpoint["hyper_parameters"])
    checkpoint["gencli"] = {
        "version": __version__,
        "format": CHECKPOINT_FORMAT,
        # Hydra's own section (if a caller left it in) only concerns the launching command, and is not gencli's to
        # rebuild: keeping it out keeps the stored config inside the allow-list of what a checkpoint may build.
        "config": {k: v for k, v in module.run_config.items() if k != "hydra"} if isinstance(module.run_config, dict)
        else module.run_config,
        # the latest logged values, so a finished run's numbers can be read back from its checkpoint
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1} if trainer else {},
        "image_shape": list(module.image_shape),
        "family": type(module).__name__,
        "conditional": bool(getattr(module, "conditional", False)),
        "num_classes": getattr(module, "num_classes", None),
        "class_names": getattr(module, "class_names", None),
        **extra,
    }


def plain(value: Any) -> Any:
    """OmegaConf containers (nested anywhere) -> plain Python lists and dicts."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for name in sorted(set(a) | set(b), key=str)
                for key in _differing_keys(a.get(name), b.get(name), f"{prefix}{name}.")]
    return [] if a == b else [prefix.rstrip(".")]
