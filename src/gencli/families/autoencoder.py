"""Autoencoder: deterministic encoder/decoder trained on reconstruction (MSE or BCE).

``noise_std > 0`` makes it a denoising autoencoder (Gaussian noise on the input, clean target).
An autoencoder has no prior of its own, so to *sample* from it we fit a full-covariance Gaussian to
the training latents over each epoch (the "ex-post density estimation" of Ghosh et al. 2020) and
decode draws from it. That fit is stored as buffers, so it travels in the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.families.base import GenerativeModel
from gencli.seeds import SampleGenerator

RECON_LOSSES = ("mse", "bce")


class EncoderDecoderModel(GenerativeModel):
    """What the autoencoder and the VAE share: the nets, the output map and the recon error.

    Class-conditional (``model.conditional=true``, the CVAE of Sohn et al. 2015): the one-hot label joins the
    encoder's features before the latent head (q(z|x, y)) and the latent before the decoder (p(x|z, y)), through
    a linear layer, so the conv nets stay as they are. Every method that takes or makes images takes ``labels``.
    """

    has_encoder = True
    has_latent = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, output: str, **base: Any):
        super().__init__(**base)
        if output not in RECON_LOSSES:
            raise ConfigError(f"model.loss/likelihood={output!r} is not known; use one of {', '.join(RECON_LOSSES)}.")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = int(latent_dim)
        self.output = output
        self.pixels = math.prod(self.image_shape)
        #: size of the label input (one-hot) the latent head and the decoder take: 0 when unconditional
        self.label_dim = self.num_classes or 0
        self.label_to_decoder = nn.Linear(self.latent_dim + self.label_dim, self.latent_dim) if self.label_dim else None

    # ---- labels
    def with_label(self, h: Tensor, labels: Tensor | None) -> Tensor:
        """[h, one_hot(labels)] for a conditional model; h itself otherwise."""
        if not self.label_dim:
            return h
        return torch.cat([h, F.one_hot(labels.to(h.device), self.label_dim).to(h.dtype)], dim=1)

    def encoder_features(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """The encoder's features with the label joined (the input of the latent head)."""
        return self.with_label(self.encoder(x), self.check_labels(labels, len(x)))

    def decoder_out(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """The decoder's raw output for latents ``z`` (of class ``labels`` when conditional)."""
        labels = self.check_labels(labels, len(z))
        if self.label_to_decoder is not None:
            z = self.label_to_decoder(self.with_label(z, labels))
        return self.decoder(z)

    def to_image(self, decoder_out: Tensor) -> Tensor:
        """Decoder output -> image in [-1, 1] (tanh for MSE/Gaussian, 2*sigmoid-1 for BCE/Bernoulli)."""
        return torch.tanh(decoder_out) if self.output == "mse" else 2 * torch.sigmoid(decoder_out) - 1

    def recon_nll(self, decoder_out: Tensor, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss summed over pixels."""
        if self.output == "bce":
            target = (x + 1) / 2
            return F.binary_cross_entropy_with_logits(decoder_out, target, reduction="none").flatten(1).sum(1)
        return (torch.tanh(decoder_out) - x).pow(2).flatten(1).sum(1)

    def decode(self, z: Tensor, labels: Tensor | None = None, **options: Any) -> Tensor:
        return self.to_image(self.decoder_out(z, labels))

    def reconstruct(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = self.check_labels(labels, len(x))
        return self.decode(self.encode(x, labels), labels)

    @torch.no_grad()
    def sample(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None, **options: Any) -> Tensor:
        labels = self.check_labels(labels, n, generator)
        return self.decode(self.prior(n, generator, labels), labels)

    # ---- editing: the honest baselines that diffusion has to beat
    def prior_mean(self, labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def inpaint(self, images: Tensor, mask: Tensor, generator: SampleGenerator = None, labels: Tensor | None = None,
                **options: Any) -> Tensor:
        """decode(encode(masked input)) with the known pixels pasted back; the masked pixels are first set to the
        mean of each image's known pixels (per channel), so the encoder sees a plain patch, not a black hole."""
        known = mask.expand_as(images)
        fill = (images * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp_min(1)
        filled = images * known + fill * (1 - known)
        return images * known + self.reconstruct(filled, labels) * (1 - known)

    @torch.no_grad()
    def vary(self, images: Tensor, strength: float, generator: SampleGenerator = None, labels: Tensor | None = None,
             **options: Any) -> Tensor:
        """Encode, move the latent toward a prior draw, decode: z' = m + sqrt(1 - s^2) (z - m) + s (p - m), with
        p drawn from the prior and m its mean (s = 1 is a fresh sample; the prior's spread is kept)."""
        from gencli.diffusion.editing import check_strength

        s = check_strength(strength)
        labels = self.check_labels(labels, len(images), generator)
        z = self.encode(images, labels)
        m = self.prior_mean(labels).to(z)
        p = self.prior(len(z), generator, labels)
        return self.decode(m + math.sqrt(1 - s * s) * (z - m) + s * (p - m), labels)

    def editing_info(self, mode: str, **options: Any) -> dict[str, Any]:
        how = ("decode(encode(input with the masked pixels set to the known pixels' mean)), known pixels pasted back"
               if mode == "inpaint" else "z' = m + sqrt(1 - s^2) (z - m) + s (prior draw - m), decoded")
        return {"family": type(self).__name__, "mode": mode, "method": "autoencoder baseline", "how": how,
                **({"strength": float(options["strength"])} if "strength" in options else {}),
                **self.conditioning_info()}

    @staticmethod
    def pixel_mse(x_hat: Tensor, x: Tensor) -> Tensor:
        """Per-sample MSE on the [0, 1] pixel scale (the scale papers report)."""
        return ((x_hat - x) / 2).pow(2).flatten(1).mean(1)


class Autoencoder(EncoderDecoderModel):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        image_shape: tuple[int, int, int],
        latent_dim: int = 16,
        loss: str = "mse",
        noise_std: float = 0.0,
        **base: Any,
    ):
        super().__init__(encoder, decoder, latent_dim, output=loss, image_shape=image_shape, **base)
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "scheduler"])
        if noise_std < 0:
            raise ConfigError(f"model.noise_std={noise_std} must be >= 0 (0 turns denoising off).")
        self.noise_std = float(noise_std)
        self.to_latent = nn.Linear(encoder.out_features + self.label_dim, self.latent_dim)
        # The Gaussian fitted to training latents: what sample() decodes from (one per class when conditional:
        # shapes (K, D) and (K, D, D); unconditional checkpoints keep (D) and (D, D)).
        classes = (self.num_classes,) if self.conditional else ()
        self.register_buffer("latent_mean", torch.zeros(*classes, self.latent_dim))
        self.register_buffer("latent_scale_tril", torch.eye(self.latent_dim).expand(*classes, -1, -1).clone())
        self._moments: list[Tensor] | None = None

    def encode(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.to_latent(self.encoder_features(x, labels))

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def training_step(self, batch, batch_idx):
        x, labels = batch[0], self.batch_labels(batch)
        noisy = x + self.noise_std * torch.randn_like(x) if self.noise_std > 0 else x
        z = self.encode(noisy, labels)
        loss = self.recon_nll(self.decoder_out(z, labels), x).mean()
        self._accumulate_moments(z.detach(), labels)
        self.log_step({"train/loss": loss}, prog_bar=("train/loss",))
        return loss

    def validation_step(self, batch, batch_idx):
        x, labels = batch[0], self.batch_labels(batch)
        out = self.decoder_out(self.encode(x, labels), labels)
        loss = self.recon_nll(out, x).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/recon_mse", self.pixel_mse(self.to_image(out), x).mean(), sync_dist=True)

    # ---- the latent Gaussian
    def on_train_epoch_start(self) -> None:
        resumed, self._resumed_moments = getattr(self, "_resumed_moments", None), None
        # A run resumed in the middle of an epoch continues that epoch's sums, so the Gaussian fitted at its
        # end is the one the uninterrupted run fits.
        self._moments = resumed["moments"] if resumed is not None and resumed["epoch"] == self.current_epoch else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._moments is not None and self._trainer is not None:
            checkpoint["gencli"]["latent_moments"] = {"epoch": self.current_epoch,
                                                      "moments": [m.detach().cpu() for m in self._moments]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = (checkpoint.get("gencli") or {}).get("latent_moments")
        if isinstance(stored, dict) and len(stored.get("moments") or []) == 3:
            classes, d = (self.num_classes if self.conditional else 1), self.latent_dim
            shapes = [(classes,), (classes, d), (classes, d, d)]  # (checkpoints before conditioning: no class axis)
            if all(isinstance(m, Tensor) and m.numel() == math.prod(shape) for m, shape in zip(stored["moments"], shapes)):
                self._resumed_moments = {"epoch": int(stored["epoch"]),
                                         "moments": [m.reshape(shape).to(self.latent_mean.device)
                                                     for m, shape in zip(stored["moments"], shapes)]}

    def _accumulate_moments(self, z: Tensor, labels: Tensor | None = None) -> None:
        """Per-class (count, sum, sum of outer products) of the training latents; one "class" when unconditional."""
        z = z.double()
        classes = self.num_classes if self.conditional else 1
        onehot = (F.one_hot(labels, classes) if labels is not None else torch.ones(len(z), 1, device=z.device)).double()
        stats = [onehot.sum(0), onehot.T @ z, torch.einsum("nk,nd,ne->kde", onehot, z, z)]
        self._moments = stats if self._moments is None else [a + b for a, b in zip(self._moments, stats)]

    def on_train_epoch_end(self) -> None:
        if self._moments is None:
            return
        count, total, outer = (self.trainer.strategy.reduce(m, reduce_op="sum") for m in self._moments)
        eye = torch.eye(total.shape[-1], dtype=total.dtype, device=total.device)
        # A class seen fewer than twice this epoch gets the Gaussian of all latents (its own would be degenerate).
        pooled = [count.sum(), total.sum(0), outer.sum(0)]
        means, trils = [], []
        for k in range(len(count)):
            c, s, o = (count[k], total[k], outer[k]) if count[k] >= 2 else pooled
            mean = s / c
            cov = o / c - torch.outer(mean, mean) + 1e-5 * eye
            means.append(mean)
            trils.append(torch.linalg.cholesky(cov))
        self.latent_mean.copy_(torch.stack(means).reshape(self.latent_mean.shape).float())
        self.latent_scale_tril.copy_(torch.stack(trils).reshape(self.latent_scale_tril.shape).float())

    def prior_mean(self, labels: Tensor | None = None) -> Tensor:
        return self.latent_mean[labels] if self.conditional and labels is not None else self.latent_mean

    def prior(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None) -> Tensor:
        """Draws from the Gaussian fitted to the training latents (of each image's class when conditional)."""
        eps = self.randn((n, self.latent_dim), generator)
        if not self.conditional:
            return self.latent_mean + eps @ self.latent_scale_tril.T
        labels = self.check_labels(labels, n, generator)
        return self.latent_mean[labels] + torch.einsum("nde,ne->nd", self.latent_scale_tril[labels], eps)

    @torch.no_grad()
    def score_batch(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        return {"recon_mse": self.pixel_mse(self.reconstruct(x, labels), x)}

    def sampling_info(self, **options: Any) -> dict[str, Any]:
        prior = "full-covariance Gaussian fitted to training latents" + (" of each class" if self.conditional else "")
        return {"family": "Autoencoder", "weights": "raw", "prior": prior, **self.conditioning_info()}
