"""Generative adversarial networks: DCGAN (BCE), WGAN-GP and hinge (SNGAN) in one family.

Training uses Lightning's manual optimisation with two optimisers, each with its own learning
rate (TTUR, Heusel et al. 2017). Every training batch makes one discriminator step; every
``n_critic``-th batch also makes one generator step (so ``n_critic=5`` is the WGAN-GP schedule of
five critic steps per generator step, each critic step on a fresh real batch). Lightning counts
every optimiser step in ``trainer.global_step``, so ``trainer.max_steps`` counts D and G steps.

Losses, on the discriminator's raw scores d = D(x):
- ``bce``: D minimises softplus(-d_real) + softplus(d_fake) (binary cross-entropy, reals -> 1,
  fakes -> 0); G minimises the non-saturating softplus(-d_fake) = -log sigmoid(d_fake)
  (Goodfellow et al. 2014; the DCGAN recipe).
- ``wgan_gp``: D (the critic) minimises mean(d_fake) - mean(d_real) + lambda * GP, with
  GP = mean((||grad_x D(x_hat)||_2 - 1)^2) at random points x_hat on lines between real and fake
  images (Gulrajani et al. 2017); G minimises -mean(d_fake).
- ``hinge``: D minimises mean(relu(1 - d_real)) + mean(relu(1 + d_fake)); G minimises -mean(d_fake)
  (Lim & Ye 2017; Miyato et al. 2018 with spectral norm).

An exponential moving average of the generator's weights (``ema_decay``; null turns it off) is
what ``sample``/``decode`` use by default (``use_ema=false`` picks the raw generator). The decay
warms up as min(ema_decay, (1 + k) / (10 + k)) after k generator steps, so short runs are not
stuck with the initial weights. Buffers (BatchNorm running statistics) are copied from the raw
generator at each update.

Truncation (``truncation=psi`` at sample time) scales the latent toward the prior's mean:
z -> mean + psi * (z - mean) = psi * z for the N(0, I) prior ("psi-scaling", the truncation trick of
StyleGAN applied in z). psi=1 is no truncation; smaller psi trades variety for typical-looking
samples. It is deterministic, so the same latents give the same images in ``mode=interpolate``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.families.base import GenerativeModel, build_optimizer
from gencli.families.ema import check_decay, ema_copy, ema_update, pick_weights, skipped_flag
from gencli.nets.modes import eval_mode
from gencli.seeds import SampleGenerator

log = logging.getLogger(__name__)

LOSSES = ("bce", "wgan_gp", "hinge")


# ----------------------------------------------------------------------------- losses
def discriminator_loss(loss: str, d_real: Tensor, d_fake: Tensor) -> Tensor:
    """The discriminator's adversarial loss (without the gradient penalty): lower is better for D."""
    if loss == "bce":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if loss == "wgan_gp":
        return d_fake.mean() - d_real.mean()
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    raise ConfigError(f"model.loss={loss!r} is not known; use one of {', '.join(LOSSES)}.")


def generator_loss(loss: str, d_fake: Tensor) -> Tensor:
    """The generator's loss on D's scores of its samples: lower is better for G."""
    if loss == "bce":
        return F.softplus(-d_fake).mean()  # non-saturating: -log sigmoid(d_fake)
    if loss in ("wgan_gp", "hinge"):
        return -d_fake.mean()
    raise ConfigError(f"model.loss={loss!r} is not known; use one of {', '.join(LOSSES)}.")


def gradient_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                     eps: Tensor | None = None) -> Tensor:
    """WGAN-GP's penalty mean((||grad D(x_hat)||_2 - 1)^2), x_hat = eps * real + (1 - eps) * fake.

    ``eps`` is one uniform number per image unless given. The graph is kept (create_graph), so the
    penalty's gradient reaches the discriminator's weights.
    """
    if eps is None:
        eps = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = discriminator(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def pairwise_accuracy(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Fraction of (real, fake) pairs where D scores the real image higher (0.5: D cannot tell)."""
    return (d_real.detach().flatten()[:, None] > d_fake.detach().flatten()[None, :]).float().mean()


#: Score margin beyond which D is "sure and right" about an image: p >= 0.99 for bce (logit log 99),
#: the hinge margin 1 for hinge (there D's loss and gradient are exactly zero). WGAN-GP's critic has no
#: such margin (it is meant to be trained to optimality), so it has none.
CONFIDENT_MARGIN = {"bce": math.log(99.0), "hinge": 1.0}


def confident_fraction(loss: str, d_real: Tensor, d_fake: Tensor) -> Tensor | None:
    """Fraction of images (real and fake) D classifies right beyond its loss's margin; None for wgan_gp."""
    margin = CONFIDENT_MARGIN.get(loss)
    if margin is None:
        return None
    right = torch.cat([d_real.detach().flatten() >= margin, d_fake.detach().flatten() <= -margin])
    return right.float().mean()


# ----------------------------------------------------------------------------- the family
class GAN(GenerativeModel):
    has_latent = True
    supported_sample_options = ("use_ema", "truncation")
    #: The GANMonitor callback watches families that set this (sample diversity, D winning).
    monitor_diversity = True

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        image_shape: tuple[int, int, int],
        latent_dim: int = 100,
        loss: str = "bce",
        n_critic: int = 1,
        gp_lambda: float = 10.0,
        ema_decay: float | None = 0.999,
        g_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        d_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        monitor: str = "train/diversity_gap",
        monitor_mode: str = "min",
        **base: Any,
    ):
        if base.get("optimizer") is not None or base.get("scheduler") is not None:
            raise ConfigError(
                "a GAN has two optimisers: set model.g_optimizer and model.d_optimizer (each with its own lr), "
                "not model.optimizer/model.scheduler (leave those null)."
            )
        super().__init__(image_shape=image_shape, monitor=monitor, monitor_mode=monitor_mode, **base)
        self.save_hyperparameters(ignore=["generator", "discriminator", "g_optimizer", "d_optimizer",
                                          "optimizer", "scheduler"])
        self.automatic_optimization = False
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss!r} is not known; use one of {', '.join(LOSSES)} "
                              "(or model=dcgan | wgan_gp | sngan).")
        if int(n_critic) < 1:
            raise ConfigError(f"model.n_critic={n_critic} must be an integer >= 1 (discriminator steps per generator step).")
        if gp_lambda < 0:
            raise ConfigError(f"model.gp_lambda={gp_lambda} must be >= 0 (WGAN-GP uses 10).")
        if loss == "wgan_gp" and getattr(discriminator, "norm", None) == "batch":
            raise ConfigError(
                "model.loss=wgan_gp with model.discriminator.norm=batch: the gradient penalty is taken per image, "
                "and batch norm makes each score depend on the whole batch. Use model.discriminator.norm=layer "
                "(what model=wgan_gp sets) or none."
            )
        gen_latent = getattr(generator, "latent_dim", latent_dim)
        if gen_latent != latent_dim:
            raise ConfigError(f"model.latent_dim={latent_dim} but the generator takes {gen_latent}-d latents; "
                              "leave model.generator.latent_dim at its default, ${model.latent_dim}.")
        for role, net in (("generator", generator), ("discriminator", discriminator)):
            built = getattr(net, "num_classes", 0) or None
            if built != self.num_classes:
                raise ConfigError(
                    f"model.{role} was built for {built or 'no'} classes but the model is "
                    f"{'conditional on ' + str(self.num_classes) + ' classes' if self.conditional else 'unconditional'}: "
                    f"leave model.{role}.num_classes at its default, ${{model.num_classes}}, and switch conditioning with "
                    "model.conditional=true|false."
                )
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = int(latent_dim)
        self.loss = loss
        self.n_critic = int(n_critic)
        self.gp_lambda = float(gp_lambda)
        self.ema_decay = check_decay(ema_decay)
        self.g_optimizer_factory = g_optimizer
        self.d_optimizer_factory = d_optimizer
        self.generator_ema: nn.Module | None = None
        if self.ema_decay is not None:
            self.generator_ema = ema_copy(generator)
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("g_steps", torch.zeros((), dtype=torch.long))
        #: Which loss the next manual_backward is for (the NonFiniteGuard names it in its message).
        self.current_loss_name = "loss"
        self._check_output_shape()

    def _check_output_shape(self) -> None:
        with torch.no_grad(), eval_mode(self.generator) as generator:
            labels = torch.zeros(1, dtype=torch.long) if self.conditional else None
            out = generator(torch.zeros(1, self.latent_dim), *([labels] if self.conditional else []))
        if tuple(out.shape[1:]) != self.image_shape:
            raise ConfigError(
                f"the generator makes images of shape {tuple(out.shape[1:])} but the data has {self.image_shape}; "
                "set model.generator.image_size=${data.image_size} and out_channels=${data.channels}."
            )

    # ----------------------------------------------------------------- sampling interface
    def prior(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None) -> Tensor:
        return self.randn((n, self.latent_dim), generator)

    def generate(self, net: nn.Module, z: Tensor, labels: Tensor | None) -> Tensor:
        """G(z) or, conditional, G(z, y)."""
        return net(z) if labels is None else net(z, labels)

    def judge(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """D(x) or, conditional, the projection discriminator's D(x, y)."""
        return self.discriminator(x) if labels is None else self.discriminator(x, labels)

    def sampling_net(self, use_ema: bool | None = None) -> nn.Module:
        return pick_weights(self.generator, self.generator_ema, use_ema, "EMA generator")

    @staticmethod
    def check_truncation(truncation: float | None) -> float | None:
        if truncation is None:
            return None
        try:
            psi = float(truncation)
        except (TypeError, ValueError):
            psi = float("nan")
        if not 0 < psi <= 1:
            raise ConfigError(f"truncation={truncation} must be a number psi in (0, 1]: latents are scaled "
                              "toward the prior mean by psi (1 = no truncation; 0.7 is a common choice).")
        return psi

    def decode(self, z: Tensor, labels: Tensor | None = None, use_ema: bool | None = None,
               truncation: float | None = None, **options: Any) -> Tensor:
        if options:
            raise ConfigError(f"{', '.join(options)} does not apply to a GAN: it supports use_ema and truncation.")
        labels = self.check_labels(labels, len(z))
        psi = self.check_truncation(truncation)
        if psi is not None:
            z = psi * z  # psi-scaling toward the mean of the N(0, I) prior
        net = self.sampling_net(use_ema)
        if net is not self.generator_ema or not net.training:
            return self.generate(net, z, labels)
        # The EMA copy is never trained: it always runs with its (copied) running statistics.
        net.eval()
        try:
            return self.generate(net, z, labels)
        finally:
            net.train()

    @torch.no_grad()
    def sample(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None, **options: Any) -> Tensor:
        return self.decode(self.prior(n, generator), self.check_labels(labels, n, generator), **options)

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)


    def sampling_info(self, use_ema: bool | None = None, truncation: float | None = None, **options: Any) -> dict[str, Any]:
        ema = self.sampling_net(use_ema) is self.generator_ema
        psi = self.check_truncation(truncation)
        return {
            "family": "GAN",
            "loss": self.loss,
            "weights": "ema" if ema else "raw",
            "ema_decay": self.ema_decay if ema else None,
            "truncation": psi,
            "truncation_method": "psi-scaling toward the prior mean (z -> psi * z)" if psi is not None else None,
            "prior": f"N(0, I), {self.latent_dim}-d",
            "generator_steps": int(self.g_steps),
            **self.conditioning_info(),
        }

    # ----------------------------------------------------------------- training
    #: what each optimiser of configure_optimizers trains (the learning-rate monitor logs lr/generator, lr/discriminator)
    optimizer_roles = ("generator", "discriminator")

    def configure_optimizers(self):
        defaults = {"lr": 2e-4, "betas": (0.5, 0.999)}
        opt_g = build_optimizer(self, self.g_optimizer_factory, list(self.generator.parameters()), **defaults)
        opt_d = build_optimizer(self, self.d_optimizer_factory, list(self.discriminator.parameters()), **defaults)
        return [opt_g, opt_d]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Under DDP each backward reduces every parameter it is given: the discriminator's step leaves the
        # generator without gradients (and, in G's turns, D's gradients are not wanted), which DDP refuses
        # at the next step unless it looks for unused parameters. The strategy wraps the model after this
        # hook, so the setting still applies; it costs one graph traversal per backward, as GANs need.
        kwargs = getattr(self._trainer.strategy, "_ddp_kwargs", None) if self._trainer is not None else None
        if isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        if self.loss == "wgan_gp" and getattr(self.discriminator, "_compiled_call_impl", None) is not None:
            # The gradient penalty differentiates the critic's input gradient (a double backward), which
            # torch.compile's AOTAutograd cannot do: the critic runs eagerly, the generator stays compiled, so
            # hardware=gpu_fast trains the WGAN-GP recipe instead of refusing it.
            self.discriminator._compiled_call_impl = None
            report = getattr(self, "compile_report", None)
            if isinstance(report, dict):
                report["discriminator"] = "eager (model.loss=wgan_gp: the gradient penalty's double backward)"
            log.info("hardware.compile=true with model.loss=wgan_gp: the critic runs without compile (its gradient "
                     "penalty needs a double backward, which torch.compile cannot take); the generator is compiled.")

    def backward_named(self, name: str, loss: Tensor) -> None:
        self.current_loss_name = name
        self.manual_backward(loss)

    def training_step(self, batch, batch_idx):
        real = batch[0]
        # conditional: the fakes are drawn for the real batch's labels (the data's class frequencies), and D judges
        # each image with its label
        labels = self.batch_labels(batch)
        opt_g, opt_d = self.optimizers()
        g_turn = (self.counter("d_steps") + 1) % self.n_critic == 0
        z = torch.randn(len(real), self.latent_dim, device=real.device)
        with torch.set_grad_enabled(g_turn):
            fake = self.generate(self.generator, z, labels)

        # ---- discriminator (critic) step
        d_real = self.judge(real, labels)
        d_fake = self.judge(fake.detach(), labels)
        d_adv = discriminator_loss(self.loss, d_real, d_fake)
        logs = {"train/d_real": d_real.detach().mean(), "train/d_fake": d_fake.detach().mean(),
                "train/d_acc": pairwise_accuracy(d_real, d_fake)}
        confident = confident_fraction(self.loss, d_real, d_fake)
        if confident is not None:
            logs["train/d_confident"] = confident
        d_loss = d_adv
        if self.loss == "wgan_gp":
            gp = gradient_penalty(lambda x: self.judge(x, labels), real, fake)
            d_loss = d_adv + self.gp_lambda * gp
            logs["train/gp"] = gp.detach()
            logs["train/wasserstein"] = -d_adv.detach()
        opt_d.zero_grad(set_to_none=True)
        self.backward_named("discriminator loss", d_loss)
        opt_d.step()
        self.count_up("d_steps", skipped_flag(opt_d))
        logs["train/d_loss"] = d_loss.detach()

        # ---- generator step, every n_critic-th batch, against the updated discriminator
        if g_turn:
            self.toggle_optimizer(opt_g)
            g_loss = generator_loss(self.loss, self.judge(fake, labels))
            opt_g.zero_grad(set_to_none=True)
            self.backward_named("generator loss", g_loss)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
            self.count_up("g_steps", skipped_flag(opt_g))
            self.update_ema(skipped_flag(opt_g))
            logs["train/g_loss"] = g_loss.detach()
        self.log_step(logs, prog_bar=("train/d_loss", "train/g_loss"))
        # For the GANMonitor callback (Lightning hands this dict to on_train_batch_end).
        return {"d_acc": logs["train/d_acc"], "d_confident": confident}

    def update_ema(self, skipped: Tensor | None = None) -> None:
        if self.generator_ema is not None:
            ema_update(self.generator_ema, self.generator, self.ema_decay, self.counter("g_steps"), skipped)

    def non_finite_hint(self) -> str:
        """Family-specific likely cause, for the NonFiniteGuard's message."""
        lrs = "model.g_optimizer.lr and model.d_optimizer.lr"
        if self.loss == "bce":
            return (f"the GAN diverged: the discriminator's logits grew without bound. Lower {lrs}, or switch to a "
                    "loss that keeps D in check (model=sngan or model=wgan_gp)")
        if self.loss == "wgan_gp":
            return (f"the critic's scores or the gradient penalty blew up. Lower {lrs}, and keep "
                    f"model.gp_lambda (now {self.gp_lambda:g}) around 10")
        return f"the GAN diverged. Lower {lrs}, or turn on spectral norm (model.discriminator.spectral_norm=true)"
