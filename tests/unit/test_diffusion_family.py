"""The UNet, the diffusion family (pixel and latent) and its sampling interface."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from gencli.diffusion.samplers import DDIMSampler, DDPMSampler
from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError
from gencli.families.diffusion import Diffusion
from gencli.nets.mlp import MLPDenoiser
from gencli.nets.unet import UNet, timestep_embedding
from gencli.optim import LinearWarmup

TINY_UNET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, norm_groups=4)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- nets
@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_keeps_the_shape_at_every_power_of_two(size, channels):
    net = UNet(channels, size, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=4)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_paper_cifar10_config_has_35_7m_parameters(compose_cfg):
    # the paper's UNet is what a GPU trainer on real data gets (a CPU trainer gets the small one: test_first_try.py)
    cfg = compose_cfg("train", ["model=ddpm", "data=cifar10", "trainer=gpu"])
    net = instantiate(cfg.model.net)
    assert n_params(net) == 35_746_307  # Ho et al. 2020: 35.7M (the reference code's count)
    assert net.ch == 128 and net.image_size == 32 and net.in_channels == 3


def test_small_cpu_unet_is_one_to_three_million_parameters(compose_cfg):
    cfg = compose_cfg("train", ["model=ddpm", "model/net=unet_cpu", "data=mnist"])
    assert 1_000_000 <= n_params(instantiate(cfg.model.net)) <= 3_000_000


@pytest.mark.parametrize("size, ch_mult", [(12, (1, 2)), (4, (1, 2, 2, 2))])
def test_unet_refuses_sizes_it_cannot_halve(size, ch_mult):
    with pytest.raises(ConfigError, match=f"image size {size}"):
        UNet(1, size, ch=8, ch_mult=ch_mult, norm_groups=4)


def test_unet_refuses_empty_levels_and_groups_and_warns_about_absent_attention_levels(caplog):
    with pytest.raises(ConfigError, match=r"ch_mult=\[\], norm_groups=4"):
        UNet(1, 8, ch=8, ch_mult=(), norm_groups=4)
    with pytest.raises(ConfigError, match="norm_groups=0"):
        UNet(1, 8, ch=8, ch_mult=(1, 2), norm_groups=0)
    with caplog.at_level("WARNING", logger="gencli.nets.unet"):
        UNet(1, 32, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=4)
    assert "no UNet level at [8] for 32x32 images (levels: [32, 16])" in caplog.text


def test_a_unet_built_for_another_size_is_refused():
    with pytest.raises(ConfigError, match="model.net.image_size=16 but the model diffuses 8x8"):
        Diffusion(UNet(1, 16, **TINY_UNET), image_shape=(1, 8, 8))


def test_unet_starts_at_zero_and_uses_time():
    net = UNet(1, 8, **TINY_UNET)
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([1, 2])).abs().max() == 0  # zero-initialised output conv, as the reference
    with torch.no_grad():  # wake the zero-initialised layers (conv2 of every block, attention projections)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = net(x[:1].expand(2, -1, -1, -1), torch.tensor([1, 900]))
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert emb[1, 0].item() == pytest.approx(math.sin(5.0))


def test_mlp_denoiser_keeps_vector_shape():
    net = MLPDenoiser(6, hidden=16, depth=2, time_dim=8)
    assert net(torch.randn(3, 6), torch.tensor([0, 1, 2])).shape == (3, 6)


def test_linear_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = LinearWarmup(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- the family
def tiny_diffusion(prediction="eps", ema_decay=0.9, size=8, sampler=None, **kwargs) -> Diffusion:
    torch.manual_seed(0)
    return Diffusion(UNet(1, size, **TINY_UNET), image_shape=(1, size, size), schedule=NoiseSchedule("linear", 100),
                     sampler=sampler or DDIMSampler(steps=5), prediction=prediction, ema_decay=ema_decay, **kwargs)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_fast_dev_run_for_each_prediction_target(compose_cfg, prediction):
    cfg = compose_cfg("train", ["model=ddpm", "model/net=unet_cpu", "data=digits", "data.image_size=8",
                                "data.batch_size=8", f"model.prediction={prediction}", "model.net.ch=8",
                                "model.net.norm_groups=4", "model.sampler.steps=3"])
    model = instantiate(cfg.model)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    for key in ("train/loss", "val/loss", "val/loss_raw"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    assert int(model.ema_updates) == 2  # one EMA update per optimiser step
    images = model.eval().sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1


def test_training_lowers_the_loss_and_the_ema_follows():
    model = tiny_diffusion(ema_decay=0.9, optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    x[:, :, 2:6, 2:6] = 1.0  # structure to learn
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64)), batch_size=16)
    g = torch.Generator().manual_seed(0)
    before = model.per_sample_loss(x, model.net, g)[0].mean().item()
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=data)
    after = model.per_sample_loss(x, model.net, torch.Generator().manual_seed(0))[0].mean().item()
    assert after < 0.7 * before
    assert int(model.ema_updates) == 60
    for ema, raw in zip(model.net_ema.parameters(), model.net.parameters()):
        assert not torch.equal(ema, raw)  # averaged, not copied
    diff = [(e - r).abs().max() for e, r in zip(model.net_ema.parameters(), model.net.parameters())]
    assert max(diff) < 0.5


def test_gradients_are_clipped_to_grad_clip():
    model = tiny_diffusion(grad_clip=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.net.parameters():
        p.grad = torch.ones_like(p)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    model.trainer = trainer
    model.configure_gradient_clipping(opt)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.net.parameters()))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_sampling_options_and_provenance():
    model = tiny_diffusion().eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ema = model.sample(2, g())
    assert torch.equal(ema, model.sample(2, g()))  # same seed, same images
    raw = model.sample(2, g(), use_ema=False)
    ddpm = model.sample(2, g(), sampler=DDPMSampler(steps=10))
    assert ema.shape == raw.shape == ddpm.shape == (2, 1, 8, 8)
    assert not torch.equal(ema, ddpm)  # the sampler option reaches the sampling loop
    info = model.sampling_info(sampler=DDIMSampler(steps=7, eta=0.3))
    assert info["sampler"] == {"name": "ddim", "steps": 7, "spacing": "trailing", "clip_denoised": True, "eta": 0.3}
    assert info["weights"] == "ema" and info["ema_decay"] == 0.9 and info["schedule"]["timesteps"] == 100
    assert model.sampling_info(use_ema=False)["weights"] == "raw"
    assert set(model.supported_sample_options) == {"use_ema", "sampler", "guidance"} and model.has_latent
    with pytest.raises(ConfigError, match="truncation"):
        model.sample(2, g(), truncation=0.5)
    with pytest.raises(ConfigError, match="no EMA"):
        tiny_diffusion(ema_decay=None).sample(1, use_ema=True)


def test_decode_is_deterministic_ddim_and_refuses_noisy_samplers():
    model = tiny_diffusion(sampler=DDPMSampler()).eval()
    torch.nn.init.normal_(model.net_ema.conv_out.weight, std=0.1)
    z = model.prior(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 1, 8, 8)
    torch.testing.assert_close(model.decode(z), model.decode(z))
    torch.testing.assert_close(model.decode(z), model.decode(z, sampler=DDIMSampler(steps=50, eta=0.0)))
    with pytest.raises(ConfigError, match="deterministic sampler"):
        model.decode(z, sampler=DDIMSampler(eta=0.5))
    # the provenance of an interpolation names the sampler decode used, not the noisy default
    assert model.sampling_info()["sampler"]["name"] == "ddpm"
    assert model.sampling_info()["sampler"]["steps"] == 100  # steps=null walks all T, and says how many
    decoded_with = model.sampling_info(mode="decode")["sampler"]
    assert decoded_with["name"] == "ddim" and decoded_with["eta"] == 0.0 and decoded_with["steps"] == 50


def test_a_net_that_changes_the_shape_is_refused():
    with pytest.raises(ConfigError, match="must keep its input.s shape"):
        Diffusion(UNet(3, 8, **TINY_UNET), image_shape=(1, 8, 8))


def test_bad_family_settings():
    with pytest.raises(ConfigError, match="model.prediction='score'"):
        tiny_diffusion(prediction="score")
    with pytest.raises(ConfigError, match="model.ema_decay=1.5"):
        tiny_diffusion(ema_decay=1.5)
    with pytest.raises(ConfigError, match="model.grad_clip=0"):
        tiny_diffusion(grad_clip=0)
    with pytest.raises(ConfigError, match="model.min_snr_gamma=0"):
        tiny_diffusion(min_snr_gamma=0)
    # more sampling steps than training timesteps: refused when the model is built, not at the first sample grid
    with pytest.raises(ConfigError, match="sampler.steps=500 must be between 1 and the model's 100"):
        tiny_diffusion(sampler=DDIMSampler(steps=500))
    with pytest.raises(ConfigError, match="sampler.steps=200"):
        tiny_diffusion().sampling_info(sampler=DDPMSampler(steps=200))


# ----------------------------------------------------------------------------- latent diffusion
@pytest.fixture
def tiny_ae_ckpt(compose_cfg, tmp_path):
    """A real gencli checkpoint of a small autoencoder on 8x8 digits."""
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", ["model=ae", "data=digits", "data.image_size=8", "data.batch_size=32",
                                "model.latent_dim=6", "model.encoder.base_channels=8", "model.decoder.base_channels=8"])
    ae = instantiate(cfg.model)
    ae.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(ae, datamodule=instantiate(cfg.data))
    path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(path)
    return path, cfg


def test_latent_diffusion_on_a_tiny_autoencoder(compose_cfg, tiny_ae_ckpt, tmp_path):
    from omegaconf import OmegaConf

    from gencli.io import restore_model

    ae_path, _ = tiny_ae_ckpt
    cfg = compose_cfg("train", ["model=ldm", f"model.first_stage_ckpt={ae_path}", "data=digits", "data.image_size=8",
                                "data.batch_size=16", "model.net.hidden=32", "model.net.depth=2",
                                "model.sampler.steps=4"])
    model = instantiate(cfg.model)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    assert model.x_shape == (6,) and model.net.in_features == 6
    assert float(model.latent_scale) == 0  # not estimated before the first batch
    frozen = {k: v.clone() for k, v in model.first_stage.state_dict().items()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1)
    datamodule = instantiate(cfg.data)
    trainer.fit(model, datamodule=datamodule)

    # The factor makes the first stage's latents unit-variance, and the first stage did not move.
    z = model.first_stage.encode(torch.stack([datamodule.train_set[i][0] for i in range(256)]))
    assert float(model.latent_scale) > 0
    assert (z * model.latent_scale).std().item() == pytest.approx(1.0, abs=0.25)
    assert not model.first_stage.training
    for k, v in model.first_stage.state_dict().items():
        assert torch.equal(v, frozen[k]), k

    # The checkpoint alone rebuilds the model: the first stage's file is no longer needed.
    path = tmp_path / "ldm.ckpt"
    trainer.save_checkpoint(path)
    ae_path.unlink()
    restored, _ = restore_model(path)
    assert float(restored.latent_scale) == float(model.latent_scale)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = restored.sample(4, g())
    assert images.shape == (4, 1, 8, 8) and images.abs().max() <= 1
    torch.testing.assert_close(images, model.eval().sample(4, g()))
    assert restored.sampling_info()["latent_shape"] == [6]


def test_latent_diffusion_needs_an_autoencoder(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["model=ldm", "data=digits", "data.image_size=8"])
    with pytest.raises(Exception, match="needs model.first_stage_ckpt=PATH"):
        instantiate(cfg.model)


def test_latent_diffusion_refuses_a_first_stage_without_encoder(compose_cfg, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", ["model=dcgan", "data=digits", "data.image_size=8", "model.generator.base_channels=8",
                                "model.discriminator.base_channels=8"])
    gan = instantiate(cfg.model)
    # what gencli train stores: the run config without Hydra's own section
    gan.run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    path = tmp_path / "gan.ckpt"
    torch.save({"state_dict": gan.state_dict(), "gencli": {"config": gan.run_config}}, path)
    cfg = compose_cfg("train", ["model=ldm", f"model.first_stage_ckpt={path}", "data=digits", "data.image_size=8"])
    with pytest.raises(Exception, match="has no encoder"):
        instantiate(cfg.model)


def test_latent_diffusion_refuses_another_image_size(compose_cfg, tiny_ae_ckpt):
    ae_path, _ = tiny_ae_ckpt
    cfg = compose_cfg("train", ["model=ldm", f"model.first_stage_ckpt={ae_path}", "data=digits", "data.image_size=16"])
    with pytest.raises(Exception, match="data.image_size=8"):
        instantiate(cfg.model)


def test_min_snr_gamma_weights_the_training_loss_only():
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    plain, weighted = tiny_diffusion(), tiny_diffusion(min_snr_gamma=1.0)
    torch.manual_seed(0)
    loss_plain = plain.training_step((x, None), 0)
    torch.manual_seed(0)  # the same t and noise
    loss_weighted = weighted.training_step((x, None), 0)
    # eps weights min(SNR, gamma) / SNR are <= 1 and < 1 wherever SNR > gamma
    assert loss_weighted < loss_plain
    torch.manual_seed(0)
    _, t = plain.per_sample_loss(x, plain.net)
    assert (plain.schedule.alphas_cumprod[t] / (1 - plain.schedule.alphas_cumprod[t]) > 1).any()
