"""The loss of the KL autoencoder's training (latent-diffusion's ``LPIPSWithDiscriminator``), without Lightning.

Generator (encoder + decoder) step, for images x, reconstructions x' and the posterior q(z|x):

    L_rec = (1/N) sum_{n,c,h,w} ( |x - x'| + perceptual_weight * P(x, x')_n )
    L     = L_rec + kl_weight * (1/N) sum_n KL(q(z|x_n) || N(0, I))  +  lambda * disc_factor * L_G

with P the optional perceptual distance (LPIPS; one value per image, added to every pixel's term as the reference
does), L_G = -mean D(x') and, from step ``disc_start`` on (before it the last term and D are not used at all),
the adaptive weight of Esser et al. 2021 (taming-transformers, eq. 7)

    lambda = clamp( ||grad_last L_rec|| / (||grad_last L_G|| + 1e-4), 0, 1e4 ) * disc_weight  (no gradient)

where ``grad_last`` is the gradient with respect to the decoder's last layer weight. The sums (not means) over
pixels and latents are the reference's, so its weights keep their meaning: KL-f4/f8 use kl_weight 1e-6,
disc_weight 0.5, disc_start 50001 (``models/first_stage_models/kl-f*/config.yaml``).

Discriminator step: disc_factor * hinge (or vanilla) loss on D(x) and D(x'.detach()), from ``disc_start`` on.

latent-diffusion divides the pixel term by exp(logvar) of an ``nn.Parameter`` logvar and adds logvar, but no
optimiser holds that parameter (``AutoencoderKL.configure_optimizers`` lists the encoder, decoder and quant convs
only), so it stays at its initial 0 and the term is the plain sum above. Its ``pixelloss_weight`` is stored and
never used; neither is here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.nets.kl_autoencoder import DiagonalGaussian

DISC_LOSSES = ("hinge", "vanilla")
#: The clamp on the adaptive weight and the epsilon in its denominator (taming-transformers' values).
MAX_ADAPTIVE_WEIGHT = 1e4
ADAPTIVE_EPS = 1e-4


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x')))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x'))): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """L_G = -mean D(x'), for either discriminator loss (as the reference)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0) -> Tensor:
    """clamp(||d rec_loss / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), 0, 1e4) * disc_weight, detached.

    The graphs of both losses are kept (retain_graph) for the backward pass of the total loss."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + ADAPTIVE_EPS)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach() * disc_weight


class KLAutoencoderLoss:
    """The two losses of one training step. Holds no parameters: the discriminator and the perceptual net are
    passed in (so the model owns D and its optimiser, and LPIPS weights never enter a checkpoint).

    ``perceptual``: None (the term is skipped) or a callable (x, x') -> one distance per image, shape (N,) or
    (N, 1, 1, 1), e.g. LPIPS on [-1, 1] images.
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
        perceptual_weight: float = 1.0,
    ):
        if disc_loss not in DISC_LOSSES:
            raise ConfigError(f"model.loss.disc_loss={disc_loss!r} is not known; use hinge (the default of "
                              "latent-diffusion's KL autoencoders) or vanilla.")
        for name, value in (("kl_weight", kl_weight), ("disc_weight", disc_weight), ("disc_factor", disc_factor),
                            ("perceptual_weight", perceptual_weight)):
            if not value >= 0:
                raise ConfigError(f"model.loss.{name}={value} must be >= 0 (latent-diffusion KL-f4: kl_weight=1e-6, "
                                  "disc_weight=0.5, disc_factor=1, perceptual_weight=1).")
        if int(disc_start) != disc_start or disc_start < 0:
            raise ConfigError(f"model.loss.disc_start={disc_start} must be a whole number of steps >= 0 (the step "
                              "the discriminator is switched on; latent-diffusion: 50001).")
        self.kl_weight = float(kl_weight)
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self.disc_loss_name = disc_loss
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.perceptual = perceptual
        self.perceptual_weight = float(perceptual_weight)

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator takes part at this global step (latent-diffusion's ``adopt_weight``)."""
        return step >= self.disc_start and self.disc_factor > 0

    def reconstruction(self, inputs: Tensor, recons: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L_rec (a scalar) and its parts for logging (per-pixel L1 mean, perceptual mean)."""
        pixel = (inputs - recons).abs()
        logs = {"l1": pixel.detach().mean()}
        per_pixel = pixel
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(inputs, recons).reshape(len(inputs), 1, 1, 1)
            per_pixel = pixel + self.perceptual_weight * p
            logs["perceptual"] = p.detach().mean()
        return per_pixel.sum() / len(inputs), logs

    def generator(self, inputs: Tensor, recons: Tensor, posterior: DiagonalGaussian, step: int,
                  last_layer: Tensor | None = None,
                  discriminator: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The encoder/decoder loss L and what to log. From ``disc_start`` on, ``discriminator`` and (when
        gradients are on) ``last_layer`` are needed; with gradients off (validation) the adaptive weight is 0."""
        rec_loss, logs = self.reconstruction(inputs, recons)
        kl = posterior.kl().sum() / len(inputs)
        loss = rec_loss + self.kl_weight * kl
        logs.update(rec_loss=rec_loss.detach(), kl=kl.detach())
        if self.disc_active(step):
            if discriminator is None:
                raise ValueError(f"step {step} >= disc_start {self.disc_start}: the generator loss needs the "
                                 "discriminator")
            g_loss = generator_adversarial_loss(discriminator(recons))
            if torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("the adaptive weight needs last_layer (the decoder's last conv weight)")
                d_weight = adaptive_weight(rec_loss, g_loss, last_layer, self.disc_weight)
            else:
                d_weight = torch.zeros((), device=inputs.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, inputs: Tensor, recons: Tensor, step: int,
                           discriminator: nn.Module) -> tuple[Tensor | None, dict[str, Tensor]]:
        """disc_factor * D's loss on real ``inputs`` and detached ``recons``; (None, {}) before ``disc_start``
        (the caller skips D's step: D does not run, so BatchNorm statistics do not move either)."""
        if not self.disc_active(step):
            return None, {}
        logits_real = discriminator(inputs.detach())
        logits_fake = discriminator(recons.detach())
        loss = self.disc_factor * self.disc_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}
