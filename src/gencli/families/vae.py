"""Variational autoencoder (Kingma & Welling 2014) with beta weighting and KL warm-up.

Loss per sample: -log p(x|z) + beta_t * KL(q(z|x) || N(0, I)), with the closed-form Gaussian KL and
beta_t rising linearly from 0 to ``beta`` over ``kl_warmup_steps``. The logged ``elbo`` always uses
beta = 1, so it is the true evidence lower bound whatever ``beta`` is.

Likelihoods:
- ``gaussian``: N(x; tanh(dec(z)), sigma^2 I). With ``obs_sigma: null`` sigma is the calibrated
  optimum sqrt(MSE) of each batch (the sigma-VAE of Rybkin et al. 2021), which balances the two
  terms without hand-tuning beta; a running estimate is kept for evaluation. A number fixes sigma.
- ``bernoulli``: binary cross-entropy on pixels in [0, 1] (the classic MNIST VAE).

Bits per dimension for the Gaussian likelihood count the 256-level quantisation of [-1, 1] data
(bin width 2/256), as for any continuous density model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.families.autoencoder import EncoderDecoderModel
from gencli.seeds import SampleGenerator

LIKELIHOODS = {"gaussian": "mse", "bernoulli": "bce"}
MIN_LOG_SIGMA = -6.0


class VAE(EncoderDecoderModel):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        image_shape: tuple[int, int, int],
        latent_dim: int = 16,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        likelihood: str = "bernoulli",
        obs_sigma: float | None = None,
        sigma_momentum: float = 0.99,
        **base: Any,
    ):
        if likelihood not in LIKELIHOODS:
            raise ConfigError(f"model.likelihood={likelihood!r} is not known; use gaussian or bernoulli.")
        if beta < 0:
            raise ConfigError(f"model.beta={beta} must be >= 0.")
        if obs_sigma is not None and obs_sigma <= 0:
            raise ConfigError(f"model.obs_sigma={obs_sigma} must be > 0, or null to calibrate it.")
        super().__init__(encoder, decoder, latent_dim, output=LIKELIHOODS[likelihood], image_shape=image_shape, **base)
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "scheduler"])
        self.beta = float(beta)
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.likelihood = likelihood
        self.obs_sigma = obs_sigma
        self.sigma_momentum = float(sigma_momentum)
        self.to_posterior = nn.Linear(encoder.out_features + self.label_dim, 2 * self.latent_dim)
        # Running log sigma of the calibrated Gaussian decoder, used when evaluating.
        self.register_buffer("log_sigma", torch.tensor(0.0 if obs_sigma is None else math.log(obs_sigma)))

    # ---- the model
    def posterior(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q(z|x) (q(z|x, y) when conditional): mean and log-variance."""
        mu, logvar = self.to_posterior(self.encoder_features(x, labels)).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def encode(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.posterior(x, labels)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    def prior_mean(self, labels: Tensor | None = None) -> Tensor:
        return torch.zeros(self.latent_dim, device=self.device)

    def prior(self, n: int, generator: SampleGenerator = None, labels: Tensor | None = None) -> Tensor:
        """z ~ N(0, I), for every class alike (a CVAE's class lives in the decoder's input, not in the prior)."""
        return self.randn((n, self.latent_dim), generator)

    # ---- the bound
    def log_likelihood(self, out: Tensor, x: Tensor, log_sigma: Tensor | None = None) -> Tensor:
        """log p(x|z) per sample, in nats."""
        if self.likelihood == "bernoulli":
            return -self.recon_nll(out, x)
        sq = (torch.tanh(out) - x).pow(2).flatten(1)
        if log_sigma is None:
            log_sigma = self.log_sigma
        log_sigma = log_sigma.clamp(min=MIN_LOG_SIGMA)
        return -(0.5 * sq * torch.exp(-2 * log_sigma) + log_sigma + 0.5 * math.log(2 * math.pi)).sum(1)

    @staticmethod
    def kl(mu: Tensor, logvar: Tensor) -> Tensor:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)

    def terms(self, x: Tensor, training: bool, labels: Tensor | None = None) -> dict[str, Tensor]:
        labels = self.check_labels(labels, len(x))
        mu, logvar = self.posterior(x, labels)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        out = self.decoder_out(z, labels)
        log_sigma = None
        if self.likelihood == "gaussian" and self.obs_sigma is None and training:
            # Calibrated decoder: the maximum-likelihood sigma for this batch (gradient flows through).
            log_sigma = 0.5 * torch.log((torch.tanh(out) - x).pow(2).mean() + 1e-12)
            with torch.no_grad():
                m = self.sigma_momentum
                self.log_sigma.copy_(m * self.log_sigma + (1 - m) * log_sigma.clamp(min=MIN_LOG_SIGMA))
        rec = self.log_likelihood(out, x, log_sigma)
        kl = self.kl(mu, logvar)
        return {"log_px": rec, "kl": kl, "elbo": rec - kl, "out": out}

    def beta_now(self) -> float:
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def bits_per_dim(self, elbo: Tensor) -> Tensor:
        nll = -elbo
        if self.likelihood == "gaussian":
            nll = nll + self.pixels * math.log(128.0)  # density on [-1, 1] -> 256-level bins
        return nll / (self.pixels * math.log(2.0))

    def score_notes(self) -> list[str]:
        papers = ("papers' bits/dim (exact negative log-likelihoods of the 8-bit images under a discretised likelihood "
                  "or a dequantised density, e.g. ~3-4.5 on CIFAR-10)")
        if self.likelihood == "bernoulli":
            return [f"bpd / val/bpd ({self.likelihood} likelihood): the Bernoulli decoder treats grey levels in [0, 1] as "
                    "probabilities of black-or-white pixels, which is not a likelihood of 8-bit images (on RGB data "
                    f"even less so): these bits/dim rank runs of this model only and are NOT comparable with {papers}. "
                    "For a comparable number use model.likelihood=gaussian, and read it as an approximation."]
        return [f"bpd / val/bpd ({self.likelihood} likelihood): the Gaussian density times the 2/256 bin width of "
                "[-1, 1] data, without dequantisation: an approximation of the discrete likelihood, close to but not "
                f"exactly {papers}."]

    def training_step(self, batch, batch_idx):
        t = self.terms(batch[0], training=True, labels=self.batch_labels(batch))
        beta = self.beta_now()
        loss = (-t["log_px"] + beta * t["kl"]).mean()
        self.log_step({"train/loss": loss, "train/recon": -t["log_px"].mean(), "train/kl": t["kl"].mean(),
                       "train/elbo": t["elbo"].mean(), "train/beta": beta, "train/sigma": self.log_sigma.exp(),
                       "train/elbo_per_dim": t["elbo"].mean() / self.pixels}, prog_bar=("train/elbo_per_dim",))
        return loss

    def validation_step(self, batch, batch_idx):
        x, labels = batch[0], self.batch_labels(batch)
        t = self.terms(x, training=False, labels=labels)
        loss = (-t["log_px"] + self.beta * t["kl"]).mean()
        self.log_dict(
            {"val/loss": loss, "val/recon": -t["log_px"].mean(), "val/kl": t["kl"].mean(),
             "val/elbo": t["elbo"].mean(), "val/bpd": self.bits_per_dim(t["elbo"]).mean(),
             "val/recon_mse": self.pixel_mse(self.reconstruct(x, labels), x).mean()},
            sync_dist=True,
        )
        self.log("val/elbo_per_dim", t["elbo"].mean() / self.pixels, prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def score_batch(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        labels = self.check_labels(labels, len(x))
        t = self.terms(x, training=False, labels=labels)
        return {
            "recon_mse": self.pixel_mse(self.reconstruct(x, labels), x),
            "elbo": t["elbo"],
            "bpd": self.bits_per_dim(t["elbo"]),
            "kl": t["kl"],
        }

    def sampling_info(self, **options: Any) -> dict[str, Any]:
        return {"family": "VAE", "weights": "raw", "prior": "N(0, I)", "output": "decoder mean", "likelihood": self.likelihood,
                **self.conditioning_info()}
