"""Denoising diffusion (Ho et al. 2020), in pixel space (:class:`Diffusion`) or in the latent space of a
trained autoencoder (:class:`LatentDiffusion`, Rombach et al. 2022).

Training is DDPM's "simple" objective: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x_0, t, eps), and
the MSE between the network's output and its target (``prediction``: eps as in DDPM, v as in
Salimans & Ho 2022, or x0). The noise schedule (``gencli.diffusion.schedule``) and the sampler
(``gencli.diffusion.samplers``) are separate objects: the network never sees them, and the sampler
is chosen at sample time (``gencli sample ckpt=... sampler=ddim sampler.steps=50``); the one in the
model config is only the default.

An exponential moving average of the network (``ema_decay``, DDPM: 0.9999, warmed up) is what
sampling uses by default (``use_ema=false`` for the raw weights); ``val/loss`` is measured with the
same weights sampling uses (``val/loss_raw`` with the raw ones). Gradients are clipped to norm
``grad_clip`` (DDPM: 1) unless ``trainer.gradient_clip_val`` says otherwise; the learning-rate
warm-up is the scheduler in the model config (``gencli.optim.LinearWarmup``).

The family's "latent" for ``mode=interpolate`` is x_T: :meth:`decode` maps it to an image with a
deterministic sampler (DDIM, eta = 0), so slerping x_T interpolates images.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gencli.diffusion import editing
from gencli.diffusion.samplers import DDIMSampler, Sampler
from gencli.diffusion.schedule import PREDICTIONS, NoiseSchedule
from gencli.errors import ConfigError
from gencli.families.base import GenerativeModel, clip_gradients
from gencli.families.ema import check_decay, ema_copy, ema_update, pick_weights, skipped_flag
from gencli.nets.modes import eval_mode
from gencli.seeds import SampleGenerator

#: Validation losses are also reported per quarter of the timestep range (t in [0, T/4), ...).
T_BUCKETS = 4


class Diffusion(GenerativeModel):
    has_latent = True  # x_T, decoded deterministically by DDIM (eta = 0)
    supported_sample_options = ("use_ema", "sampler", "guidance")
    #: x0 estimates are clipped to the data range [-1, 1] when a sampler asks (pixel space only).
    clip_range = True

    def __init__(
        self,
        net: nn.Module,
        image_shape: tuple[int, int, int],
        schedule: NoiseSchedule | None = None,
        sampler: Sampler | None = None,
        prediction: str = "eps",
        ema_decay: float | None = 0.9999,
        grad_clip: float | None = 1.0,
        min_snr_gamma: float | None = None,
        monitor: str = "val/loss",
        monitor_mode: str = "min",
        x_shape: tuple[int, ...] | None = None,
        label_dropout: float = 0.1,
        guidance: float = 1.0,
        **base: Any,
    ):
        super().__init__(image_shape=image_shape, monitor=monitor, monitor_mode=monitor_mode, **base)
        self.save_hyperparameters(ignore=["net", "schedule", "sampler", "optimizer", "scheduler", "x_shape"])
        if prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction={prediction!r} is not known; use eps (DDPM), v or x0.")
        if grad_clip is not None and grad_clip <= 0:
            raise ConfigError(f"model.grad_clip={grad_clip} must be > 0 (DDPM clips to norm 1), or null for no clipping.")
        self.net = net
        self.schedule = schedule or NoiseSchedule()
        self.default_sampler = self.check_sampler(sampler or DDIMSampler())
        self.prediction = prediction
        self.ema_decay = check_decay(ema_decay)
        self.net_ema = ema_copy(net) if self.ema_decay is not None else None
        self.grad_clip = grad_clip
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ConfigError(f"model.min_snr_gamma={min_snr_gamma} must be > 0 (Hang et al. use 5), or null for "
                              "DDPM's unweighted loss.")
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        #: The shape the diffusion runs on: the image itself here, the first stage's latent for LDM.
        self.x_shape = tuple(x_shape or self.image_shape)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.current_loss_name = "diffusion loss"
        built = getattr(net, "num_classes", 0) or None
        if built != self.num_classes:
            raise ConfigError(
                f"model.net was built for {built or 'no'} classes but the model is "
                f"{'conditional on ' + str(self.num_classes) + ' classes' if self.conditional else 'unconditional'}: "
                "leave model.net.num_classes at its default, ${model.num_classes}, and switch conditioning with "
                "model.conditional=true|false."
            )
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"model.label_dropout={label_dropout} must be in [0, 1): the share of training labels "
                              "replaced by 'no class' (Ho & Salimans use 0.1 or 0.2; 0 gives no unconditional model, so "
                              "guidance other than 1 is then meaningless).")
        self.label_dropout = float(label_dropout)
        self.default_guidance = self.check_guidance(guidance, default=True)
        self._check_net()

    def _check_net(self) -> None:
        x = torch.zeros(2, *self.x_shape)
        fix = ("a denoiser must keep its input's shape: leave model.net.in_channels and model.net.image_size at "
               "their ${data.channels} / ${data.image_size} defaults.")
        built_for = getattr(self.net, "image_size", None)
        if built_for is not None and len(self.x_shape) == 3 and built_for != self.x_shape[-1]:
            # A UNet runs at other sizes too, but its attention levels were placed for image_size.
            raise ConfigError(f"model.net.image_size={built_for} but the model diffuses {self.x_shape[-1]}x"
                              f"{self.x_shape[-1]} inputs; {fix}")
        try:
            with torch.no_grad(), eval_mode(self.net):
                out = self.net(x, torch.zeros(2, dtype=torch.long))
        except RuntimeError as err:
            raise ConfigError(f"model.net cannot take inputs of shape {tuple(x.shape[1:])} "
                              f"({str(err).splitlines()[0][:160]}); {fix}") from err
        if tuple(out.shape) != tuple(x.shape):
            raise ConfigError(f"model.net maps inputs of shape {tuple(x.shape[1:])} to {tuple(out.shape[1:])}; {fix}")

    # ----------------------------------------------------------------- where the diffusion runs
    def to_x(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> what the diffusion models (the images themselves here)."""
        return images

    def to_image(self, x: Tensor) -> Tensor:
        """A sample of x_0 -> an image in [-1, 1]."""
        return x.clamp(-1, 1)

    # ----------------------------------------------------------------- the denoiser
    def sampling_net(self, use_ema: bool | None = None) -> nn.Module:
        return pick_weights(self.net, self.net_ema, use_ema, "EMA weights")

    def denoiser(self, net: nn.Module, labels: Tensor | None = None, guidance: float | None = None
                 ) -> Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]:
        """``denoise(x_t, t, clip) -> (x0_hat, eps_hat)`` for the samplers (and the editing modes), with
        classifier-free guidance when the model is conditional: every sampler gets it by getting this."""

        def denoise(x: Tensor, t: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
            out = self.guided_output(net, x, t, labels, guidance)
            return self.schedule.split_prediction(self.prediction, out, x, t, clip_x0=clip and self.clip_range)

        return denoise

    def guided_output(self, net: nn.Module, x: Tensor, t: Tensor, labels: Tensor | None,
                      guidance: float | None) -> Tensor:
        """The net's output, guided (Ho & Salimans 2022): uncond + w (cond - uncond), with w = ``guidance``; w = 0 is
        the unconditional model (the "no class" label), w = 1 the conditional one, each one evaluation; any other w
        evaluates both in one batch of 2N. The guidance is applied to the net's output, whatever it predicts (eps, v
        or x0): each is linear in the other two given x_t, so guiding one guides all three alike."""
        if labels is None:
            return net(x, t)
        w = self.default_guidance if guidance is None else guidance
        if w == 1:
            return net(x, t, labels)
        null = torch.full_like(labels, self.num_classes)
        if w == 0:
            return net(x, t, null)
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, labels]))
        uncond, cond = both.chunk(2)
        return uncond + w * (cond - uncond)

    def check_guidance(self, guidance: Any, default: bool = False) -> float:
        """The guidance weight w as a float >= 0; only conditional models take one at sample time."""
        if guidance is None:
            return getattr(self, "default_guidance", 1.0)
        where = "model.guidance" if default else "guidance"
        if not default and not self.conditional:
            raise ConfigError(f"guidance={guidance} needs a class-conditional diffusion model (classifier-free "
                              "guidance mixes its conditional and unconditional predictions); this checkpoint is "
                              "unconditional. Drop guidance=, or train with model.conditional=true.")
        try:
            w = float(guidance)
        except (TypeError, ValueError):
            w = float("nan")
        if not w >= 0 or w == float("inf"):
            raise ConfigError(f"{where}={guidance} must be a number >= 0: the classifier-free guidance weight w (0: "
                              "unconditional, 1: the plain conditional model, 2-4: stronger class fidelity).")
        if w not in (0.0, 1.0) and self.conditional and self.label_dropout == 0:
            raise ConfigError(f"{where}={guidance} mixes in the unconditional prediction, but this model was trained with "
                              "model.label_dropout=0, so its 'no class' input was never trained. Use guidance=1, or "
                              "train with model.label_dropout=0.1.")
        return w

    def guidance_nfe_factor(self, guidance: float | None) -> int:
        """Network evaluations per image per step: 2 when guidance mixes two predictions, else 1."""
        if not self.conditional:
            return 1
        w = self.check_guidance(guidance)
        return 1 if w in (0.0, 1.0) else 2

    def check_sampler(self, sampler: Any) -> Sampler:
        if sampler is None:
            return self.default_sampler
        if not isinstance(sampler, Sampler):
            raise ConfigError(f"sampler={sampler!r} is not a sampler; use sampler=ddpm, ddim, dpmpp_2m or heun "
                              "(conf/sampler/), e.g. sampler=dpmpp_2m sampler.steps=20.")
        sampler.timesteps(self.schedule)  # steps within the schedule's T: fail now, not after training or a data pass
        return sampler

    # ----------------------------------------------------------------- the sampling interface
    def prior(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None) -> Tensor:
        """x_T ~ N(0, I), for every class alike (the class steers the denoiser)."""
        return self.randn((n, *self.x_shape), generator)

    @torch.no_grad()
    def sample(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None,
               use_ema: bool | None = None, sampler: Sampler | None = None, guidance: float | None = None,
               **options: Any) -> Tensor:
        if options:
            raise ConfigError(f"{', '.join(options)} does not apply to a diffusion model: it supports use_ema, sampler "
                              "and guidance.")
        sampler = self.check_sampler(sampler)
        labels = self.check_labels(labels, n, generator)
        guidance = self.check_guidance(guidance)
        x_T = self.prior(n, generator)
        with eval_mode(self.sampling_net(use_ema)) as net:
            x0 = sampler.sample(self.denoiser(net, labels, guidance), self.schedule, x_T, generator)
        return self.to_image(x0)

    @torch.no_grad()
    def decode(self, z: Tensor, labels: Tensor | None = None, use_ema: bool | None = None,
               sampler: Sampler | None = None, guidance: float | None = None, **options: Any) -> Tensor:
        """x_T -> image with a deterministic sampler: DDIM with eta = 0 (the default sampler's steps) unless given one."""
        if options:
            raise ConfigError(f"{', '.join(options)} does not apply to a diffusion model: it supports use_ema, sampler "
                              "and guidance.")
        sampler = self.decode_sampler(sampler)
        labels = self.check_labels(labels, len(z))
        guidance = self.check_guidance(guidance)
        with eval_mode(self.sampling_net(use_ema)) as net:
            return self.to_image(sampler.sample(self.denoiser(net, labels, guidance), self.schedule, z.to(self.device)))

    def decode_sampler(self, sampler: Sampler | None = None) -> Sampler:
        """The deterministic sampler :meth:`decode` uses: the given one, else the default sampler when it is
        deterministic, else DDIM with eta = 0 and the default sampler's steps (at most 50) and spacing."""
        if sampler is None:
            default = self.default_sampler
            sampler = default if default.deterministic else DDIMSampler(
                steps=min(default.steps or 50, 50), eta=0.0, spacing=default.spacing)
        sampler = self.check_sampler(sampler)
        if not sampler.deterministic:
            raise ConfigError(
                f"mode=interpolate decodes x_T with a deterministic sampler, and {sampler!r} adds noise at every step. "
                "Use sampler=ddim with sampler.eta=0 (the default for interpolation), or drop sampler=."
            )
        return sampler

    # ----------------------------------------------------------------- editing
    inpaint_options = ("method", "jump_length", "jump_n_sample")

    @torch.no_grad()
    def inpaint(self, images: Tensor, mask: Tensor, generator: SampleGenerator = None, labels: Tensor | None = None,
                use_ema: bool | None = None, sampler: Sampler | None = None, guidance: float | None = None,
                method: str = "repaint", jump_length: int = 10, jump_n_sample: int = 10) -> Tensor:
        """RePaint or replacement (:mod:`gencli.diffusion.editing`); the known pixels are pasted back at the end."""
        sampler = self.check_sampler(sampler)
        labels = self.check_labels(labels, len(images), generator)
        guidance = self.check_guidance(guidance)
        known, mask_x = self.x_known(images, mask)
        x_T = self.prior(len(images), generator)
        with eval_mode(self.sampling_net(use_ema)) as net:
            denoise = self.denoiser(net, labels, guidance)
            x0 = editing.inpaint(self.inpaint_denoiser(denoise, images, mask), self.schedule, sampler,
                                 known, mask_x, x_T, generator, method, jump_length, jump_n_sample)
        return images * mask + self.to_image(x0) * (1 - mask)

    def x_known(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The known x and the mask in x's space (pixel diffusion: the image and its mask themselves)."""
        return self.to_x(images), mask

    def inpaint_denoiser(self, denoise, images: Tensor, mask: Tensor):
        """The denoiser inpainting uses (pixel diffusion: the plain one; the known region is pasted into x_t)."""
        return denoise

    @torch.no_grad()
    def vary(self, images: Tensor, strength: float, generator: SampleGenerator = None, labels: Tensor | None = None,
             use_ema: bool | None = None, sampler: Sampler | None = None, guidance: float | None = None) -> Tensor:
        """SDEdit (:func:`gencli.diffusion.editing.vary`), in latent space for latent diffusion."""
        sampler = self.check_sampler(sampler)
        labels = self.check_labels(labels, len(images), generator)
        guidance = self.check_guidance(guidance)
        with eval_mode(self.sampling_net(use_ema)) as net:
            x0 = editing.vary(self.denoiser(net, labels, guidance), self.schedule, sampler, self.to_x(images), strength,
                              generator)
        return self.to_image(x0)

    def editing_info(self, mode: str, use_ema: bool | None = None, sampler: Sampler | None = None,
                     guidance: float | None = None, **options: Any) -> dict[str, Any]:
        info = {**self.sampling_info(use_ema=use_ema, sampler=sampler, guidance=guidance), "mode": mode}
        used = self.check_sampler(sampler)
        if mode == "variation":
            info.update(editing.variation_info(used, self.schedule, editing.check_strength(options.get("strength", 1))))
        elif mode == "inpaint":
            method = options.get("method", "repaint")
            jumps = int(options.get("jump_length", 10)), int(options.get("jump_n_sample", 10))
            editing.check_inpaint(method, used, *jumps)
            info.update(method=method, nfe=editing.inpaint_nfe(method, used, self.schedule, *jumps)
                        * self.guidance_nfe_factor(guidance),
                        **({"jump_length": jumps[0], "jump_n_sample": jumps[1]} if method == "repaint" else {}))
        return info

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(x, t) if labels is None else self.net(x, t, labels)

    def sampling_info(self, use_ema: bool | None = None, sampler: Sampler | None = None, mode: str = "sample",
                      guidance: float | None = None, **options: Any) -> dict[str, Any]:
        ema = self.sampling_net(use_ema) is self.net_ema
        used = self.decode_sampler(sampler) if mode == "decode" else self.check_sampler(sampler)
        conditioning = {}
        if self.conditional:
            conditioning = {**self.conditioning_info(), "guidance": self.check_guidance(guidance),
                            "guidance_method": "classifier-free (Ho & Salimans 2022): uncond + w (cond - uncond)",
                            "label_dropout": self.label_dropout}
        return {
            "family": type(self).__name__,
            "weights": "ema" if ema else "raw",
            "ema_decay": self.ema_decay if ema else None,
            # steps as walked (a sampler with steps=null walks all T)
            "sampler": {**used.describe(), "steps": len(used.timesteps(self.schedule))},
            # network evaluations per image: what sampling costs, whichever sampler (Heun: 2 per step but the last)
            "nfe": used.nfe(self.schedule) * self.guidance_nfe_factor(guidance),
            "schedule": self.schedule.describe(),
            "prediction": self.prediction,
            "ema_updates": int(self.ema_updates),
            **conditioning,
        }

    # ----------------------------------------------------------------- training
    def per_sample_loss(self, x0: Tensor, net: nn.Module, generator: torch.Generator | None = None,
                        labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """DDPM's simple loss per sample (mean over dimensions) and the t it was taken at."""
        t = self.schedule.sample_timesteps(len(x0), x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device).to(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        target = self.schedule.target(self.prediction, x0, noise, t)
        out = net(x_t, t) if labels is None else net(x_t, t, labels)
        return (out - target).pow(2).flatten(1).mean(1), t

    def training_labels(self, batch) -> Tensor | None:
        """The batch's labels, each replaced by "no class" (index num_classes) with probability label_dropout, so the
        one net also learns the unconditional model that guidance needs (Ho & Salimans 2022)."""
        labels = self.batch_labels(batch)
        if labels is None or self.label_dropout == 0:
            return labels
        drop = torch.rand(len(labels), device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def training_step(self, batch, batch_idx):
        x0 = self.to_x(batch[0])
        loss, t = self.per_sample_loss(x0, self.net, labels=self.training_labels(batch))
        if self.min_snr_gamma is not None:  # training only: val/loss stays DDPM's simple loss, comparable across runs
            loss = loss * self.schedule.min_snr_weight(self.prediction, t, self.min_snr_gamma, x0)
        loss = loss.mean()
        self.log_step({"train/loss": loss}, prog_bar=("train/loss",))
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # The EMA follows each optimiser step (once per step, also with gradient accumulation) here rather than
        # in on_train_batch_end: callbacks run before that hook, so a checkpoint written at a step boundary
        # (every_n_steps, preemption) would hold weights one EMA update ahead of their average.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.net_ema is None:
            return
        skipped = skipped_flag(optimizer)
        decay = ema_update(self.net_ema, self.net, self.ema_decay, self.counter("ema_updates"), skipped)
        self.count_up("ema_updates", skipped)
        self.log_step({"train/ema_decay": decay})

    def validation_step(self, batch, batch_idx):
        x0 = self.to_x(batch[0])
        nets = {"val/loss": self.sampling_net()}
        if self.net_ema is not None:
            nets["val/loss_raw"] = self.net
        for name, net in nets.items():
            # The same t and noise for every validation pass, so epochs compare like with like.
            generator = torch.Generator().manual_seed(1_000_003 * batch_idx + 17)
            loss, t = self.per_sample_loss(x0, net, generator, labels=self.batch_labels(batch))
            self.log(name, loss.mean(), prog_bar=name == "val/loss", sync_dist=True, batch_size=len(x0))
            if name == "val/loss":
                bucket = (t * T_BUCKETS) // self.schedule.timesteps
                for b in range(T_BUCKETS):
                    # Logged on every batch, even with an empty bucket (weight 0), so that under DDP every rank
                    # joins the same collectives; the epoch value is the sample-weighted mean over all ranks.
                    chosen = loss[bucket == b]
                    self.log(f"val/loss_t{b}", chosen.sum() / max(len(chosen), 1), sync_dist=True,
                             batch_size=len(chosen))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        clip_gradients(self, optimizer, clip, gradient_clip_algorithm)

    def non_finite_hint(self) -> str:
        return ("the diffusion loss diverged, usually a learning rate too high for the batch size: lower "
                "model.optimizer.lr, lengthen the warm-up (model.scheduler.warmup_steps), or keep gradient clipping on "
                f"(model.grad_clip, now {self.grad_clip})")


class LatentDiffusion(Diffusion):
    """Diffusion in the latent space of a frozen, trained ``ae``/``vae`` (``model.first_stage_ckpt``).

    Latents (the encoder's mean) are multiplied by ``latent_scale`` = 1 / std of the latents of the first
    batch the model sees (Lightning's sanity-check validation batch, when it runs one, else the first
    training batch; both are real images of the data set), so the diffusion sees unit-variance data whatever the autoencoder's scale; the
    factor is a buffer, so it travels in the checkpoint. Samples are decoded by the frozen first stage.
    The first stage's weights are part of this model's state_dict and its config is written into the
    checkpoint, so ``gencli sample`` needs only this checkpoint, not the first stage's file.
    """

    clip_range = False  # latents have no fixed range

    def __init__(
        self,
        net: nn.Module | Callable[..., nn.Module],
        image_shape: tuple[int, int, int],
        first_stage_ckpt: str | None = None,
        first_stage_config: str | None = None,
        **kwargs: Any,
    ):
        first_stage, first_stage_config = self.load_first_stage(first_stage_ckpt, first_stage_config)
        if tuple(first_stage.image_shape) != tuple(int(s) for s in image_shape):
            raise ConfigError(
                f"model.first_stage_ckpt={first_stage_ckpt} was trained on images of shape {tuple(first_stage.image_shape)} "
                f"but data= gives {tuple(image_shape)}: train latent diffusion on the first stage's own data set and size "
                f"(data.image_size={first_stage.image_shape[-1]} data.channels={first_stage.image_shape[0]})."
            )
        latent_shape = (int(first_stage.latent_dim),)
        if not isinstance(net, nn.Module):
            net = net(in_features=latent_shape[0])  # a partial: the latent size is known only now
        super().__init__(net=net, image_shape=image_shape, x_shape=latent_shape, **kwargs)
        self.save_hyperparameters(ignore=["net", "schedule", "sampler", "optimizer", "scheduler", "x_shape",
                                          "first_stage_config"])
        self.first_stage = first_stage.requires_grad_(False).eval()
        # Lightning warns about modules in eval mode at the start of fit; here that is the point.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        self.first_stage_config = first_stage_config
        self.register_buffer("latent_scale", torch.zeros(()))  # 0 until estimated on the first batch

    @staticmethod
    def load_first_stage(path: str | None, config: str | None) -> tuple[GenerativeModel, str]:
        """The first stage and its run config as JSON (a string, so Hydra does not instantiate what is inside)."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        if config is not None:  # restoring a latent-diffusion checkpoint: the weights come with it
            from gencli.safety import check_config

            source = "model.first_stage_config (inside this latent diffusion checkpoint)"
            try:
                stored = json.loads(config)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{source} is not the JSON gencli writes ({err}); the checkpoint was edited or is "
                                  "corrupt.") from err
            if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
                raise ConfigError(f"{source} holds no model config; the checkpoint was edited or is corrupt.")
            check_config(stored, source)  # it comes from a file: nothing outside the allow-list is built
            first_stage = instantiate(OmegaConf.create(stored).model)
            first_stage.run_config = stored
        elif path:
            from gencli.checkpoints import restore_model

            first_stage, checkpoint = restore_model(path, key="model.first_stage_ckpt")
            config = json.dumps(checkpoint["gencli"]["config"])
        else:
            raise ConfigError("model=ldm needs model.first_stage_ckpt=PATH: the checkpoint of a trained autoencoder, e.g. "
                              "from 'gencli train model=vae data=mnist' (its checkpoints/last.ckpt).")
        if getattr(first_stage, "conditional", False):
            raise ConfigError(f"model.first_stage_ckpt={path} holds a class-conditional {type(first_stage).__name__}; "
                              "latent diffusion needs an unconditional first stage (its encoder and decoder take no "
                              "labels). Train the autoencoder with model.conditional=false and make the latent "
                              "diffusion conditional instead (model.conditional=true).")
        if not getattr(first_stage, "has_encoder", False):
            raise ConfigError(f"model.first_stage_ckpt={path} holds a {type(first_stage).__name__}, which has no encoder; "
                              "latent diffusion needs an autoencoder checkpoint (model=ae or model=vae).")
        return first_stage, config

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()  # frozen: batch norm keeps its trained statistics
        return self

    @torch.no_grad()
    def to_x(self, images: Tensor) -> Tensor:
        z = self.first_stage.encode(images)
        if float(self.latent_scale) == 0.0:
            self.estimate_latent_scale(z)
        return z * self.latent_scale

    def estimate_latent_scale(self, z: Tensor) -> None:
        std = z.float().std()
        if self._trainer is not None:
            std = self.trainer.strategy.reduce(std, reduce_op="mean")  # every rank uses the same factor
        if not torch.isfinite(std) or std <= 0:
            raise ConfigError(f"the first stage's latents have standard deviation {float(std)}: it cannot be scaled to "
                              "unit variance. Check model.first_stage_ckpt (a collapsed or untrained autoencoder?).")
        self.latent_scale.fill_(1.0 / float(std))

    def to_image(self, x: Tensor) -> Tensor:
        if float(self.latent_scale) == 0.0:
            raise ConfigError("this latent diffusion model has not seen a training batch yet, so its latent scale is "
                              "unknown: sample from a checkpoint written after training started.")
        return self.first_stage.decode(x / self.latent_scale).clamp(-1, 1)

    def x_known(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        # A latent has no pixels to paste (gencli's first stages encode to a vector): the known region is
        # imposed on every x0 estimate in pixel space instead (inpaint_denoiser), and pasted once more at the end.
        return self.to_x(images), None

    def inpaint_denoiser(self, denoise, images: Tensor, mask: Tensor):
        """Each x0 estimate is decoded, its known pixels replaced by the input's, and encoded again (eps follows),
        so the sampler is steered toward latents whose decoding agrees with the known region."""

        def projected(x: Tensor, t: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
            x0, _ = denoise(x, t, clip)
            decoded = self.first_stage.decode(x0 / self.latent_scale)
            x0 = self.first_stage.encode(images * mask + decoded * (1 - mask)) * self.latent_scale
            alpha_bar = self.schedule.alpha_bar_at(t, x)
            return x0, (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

        return projected

    def editing_info(self, mode: str, **options: Any) -> dict[str, Any]:
        info = super().editing_info(mode, **options)
        if mode == "inpaint":
            info["latent"] = ("known pixels imposed on each decoded x0 estimate, re-encoded (the latent is a vector "
                              "without pixels); pasted back at the end")
        return info

    def sampling_info(self, **options: Any) -> dict[str, Any]:
        return {**super().sampling_info(**options), "latent_scale": float(self.latent_scale),
                "latent_shape": list(self.x_shape), "first_stage": type(self.first_stage).__name__,
                "first_stage_ckpt": self.hparams.get("first_stage_ckpt")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        config = copy.deepcopy(checkpoint["gencli"]["config"])
        if config is not None:
            config["model"]["first_stage_config"] = self.first_stage_config
        checkpoint["gencli"]["config"] = config
