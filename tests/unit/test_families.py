"""Every family on every data module (fast_dev_run); the autoencoder and VAE maths and interface."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from gencli.errors import ConfigError
from gencli.families.vae import VAE
from gencli.nets.conv import ConvDecoder, ConvEncoder


def data_overrides(name, mnist_root, cifar_root, image_folder):
    return {
        "digits": ["data=digits", "data.image_size=8"],
        "mnist": ["data=mnist", f"data.root={mnist_root}", "data.image_size=8"],
        "fashion_mnist": ["data=fashion_mnist", f"data.root={mnist_root}", "data.image_size=8"],
        "cifar10": ["data=cifar10", f"data.root={cifar_root}", "data.image_size=8"],
        "folder": ["data=folder", f"data.root={image_folder}", "data.image_size=8"],
    }[name]


# Small nets, so that a fast_dev_run of each family on each data module takes a second or two.
SMALL_NETS = {
    "ae": ["model.encoder.base_channels=8", "model.decoder.base_channels=8"],
    "vae": ["model.encoder.base_channels=8", "model.decoder.base_channels=8"],
    "dcgan": ["model.generator.base_channels=8", "model.discriminator.base_channels=8"],
    "ddpm": ["model/net=unet_cpu", "model.net.ch=8", "model.net.norm_groups=4", "model.net.ch_mult=[1,2]",
             "model.net.attn_resolutions=[4]", "model.sampler.steps=2"],
}


@pytest.mark.filterwarnings("ignore:data=folder skipped")
@pytest.mark.parametrize("data", ["digits", "mnist", "fashion_mnist", "cifar10", "folder"])
@pytest.mark.parametrize("model", list(SMALL_NETS))
def test_fast_dev_run(compose_cfg, model, data, mnist_root, cifar_root, image_folder):
    cfg = compose_cfg("train", [f"model={model}", *data_overrides(data, mnist_root, cifar_root, image_folder),
                                "data.batch_size=8", *SMALL_NETS[model]])
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(net, datamodule=datamodule)
    assert math.isfinite(float(trainer.callback_metrics["train/d_loss" if model == "dcgan" else "train/loss"]))
    samples = net.eval().sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, *datamodule.image_shape) and samples.abs().max() <= 1


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_nets_any_power_of_two_size(size, channels):
    enc, dec = ConvEncoder(channels, size, 32, base_channels=8), ConvDecoder(5, channels, size, base_channels=8)
    assert enc(torch.randn(2, channels, size, size)).shape == (2, 32)
    assert dec(torch.randn(2, 5)).shape == (2, channels, size, size)


@pytest.mark.parametrize("size", [12, 4, 100])
def test_conv_nets_reject_other_sizes(size):
    with pytest.raises(ConfigError, match=f"image size {size}.*data.image_size"):
        ConvEncoder(1, size, 8)


def tiny_vae(**kwargs) -> VAE:
    return VAE(ConvEncoder(1, 8, 16, base_channels=4), ConvDecoder(4, 1, 8, base_channels=4), (1, 8, 8),
               latent_dim=4, **kwargs)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(1, 4), torch.randn(1, 4) * 0.5
    z = mu + torch.randn(200_000, 4) * (0.5 * logvar).exp()
    log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0, 1).log_prob(z).sum(1)
    assert VAE.kl(mu, logvar).item() == pytest.approx((log_q - log_p).mean().item(), rel=0.02)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_elbo_is_log_likelihood_minus_kl_whatever_beta(likelihood):
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    a, b = tiny_vae(beta=0.5, likelihood=likelihood).eval(), tiny_vae(beta=4.0, likelihood=likelihood).eval()
    b.load_state_dict(a.state_dict())
    elbos = []
    for vae in (a, b):
        torch.manual_seed(1)
        t = vae.terms(x, training=False)
        assert torch.allclose(t["elbo"], t["log_px"] - t["kl"])
        elbos.append(t["elbo"])
    assert torch.allclose(*elbos)  # beta weights the loss, never the reported bound


def test_gaussian_log_likelihood_matches_torch_distributions():
    vae = tiny_vae(likelihood="gaussian", obs_sigma=0.3)
    out, x = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 2 - 1
    expected = torch.distributions.Normal(torch.tanh(out), 0.3).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(vae.log_likelihood(out, x), expected, atol=1e-4)


def test_kl_warmup_ramps_beta():
    vae = tiny_vae(beta=2.0, kl_warmup_steps=100)

    class FakeTrainer:
        global_step = 25

    vae._trainer = FakeTrainer()
    assert vae.beta_now() == pytest.approx(0.5)
    FakeTrainer.global_step = 500
    assert vae.beta_now() == pytest.approx(2.0)


def test_bits_per_dim_counts_the_quantisation_bins():
    vae = tiny_vae(likelihood="gaussian")
    elbo = torch.tensor([-100.0])
    expected = (100 + 64 * math.log(128)) / (64 * math.log(2))
    assert vae.bits_per_dim(elbo).item() == pytest.approx(expected)


def test_vae_rejects_bad_values():
    with pytest.raises(ConfigError, match="likelihood='laplace'"):
        tiny_vae(likelihood="laplace")
    with pytest.raises(ConfigError, match="beta=-1"):
        tiny_vae(beta=-1)


def test_autoencoder_prior_is_fitted_to_training_latents(compose_cfg):
    cfg = compose_cfg("train", ["model=ae", "data=digits", "data.image_size=8", "model.latent_dim=3"])
    ae = instantiate(cfg.model)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(ae, datamodule=instantiate(cfg.data))
    # The fit comes from latents seen in the epoch: its mean is no longer the untrained zero.
    assert ae.latent_mean.abs().sum() > 0
    cov = ae.latent_scale_tril @ ae.latent_scale_tril.T
    assert torch.allclose(cov, cov.T, atol=1e-5) and torch.linalg.eigvalsh(cov).min() > 0
    z = ae.prior(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), ae.latent_mean, atol=0.05 * cov.diag().sqrt().max().item() + 1e-3)
