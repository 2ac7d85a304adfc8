"""The DCGAN nets and the GAN family: shapes, optimiser step counts, EMA, sampling options, configs."""

from __future__ import annotations

import io
import logging

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from gencli.errors import ConfigError
from gencli.families.gan import GAN
from gencli.nets.dcgan import DCGANDiscriminator, DCGANGenerator


def tiny_gan(loss="bce", n_critic=1, size=8, channels=1, ema_decay=0.999, d_norm="layer", **kwargs) -> GAN:
    torch.manual_seed(0)
    return GAN(
        generator=DCGANGenerator(latent_dim=8, out_channels=channels, image_size=size, base_channels=8),
        discriminator=DCGANDiscriminator(in_channels=channels, image_size=size, base_channels=8, norm=d_norm),
        image_shape=(channels, size, size), latent_dim=8, loss=loss, n_critic=n_critic, ema_decay=ema_decay, **kwargs,
    )


def fit(model: GAN, batches: int, batch_size: int = 4, callbacks=(), **trainer_kwargs) -> L.Trainer:
    c, h, w = model.image_shape
    images = torch.rand(batches * batch_size, c, h, w) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=batch_size)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        **trainer_kwargs)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


@pytest.fixture(autouse=True)
def quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- nets
@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_nets_any_power_of_two_size_and_channel_count(size, channels):
    g = DCGANGenerator(latent_dim=5, out_channels=channels, image_size=size, base_channels=4)
    d = DCGANDiscriminator(in_channels=channels, image_size=size, base_channels=4, spectral_norm=size == 16)
    images = g(torch.randn(3, 5))
    assert images.shape == (3, channels, size, size)
    assert images.abs().max() <= 1
    assert d(images).shape == (3,)


def test_spectral_norm_keeps_a_weights_only_state_dict():
    d = DCGANDiscriminator(in_channels=1, image_size=16, base_channels=4, norm="none", spectral_norm=True)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    buffer = io.BytesIO()
    torch.save(d.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    again = DCGANDiscriminator(in_channels=1, image_size=16, base_channels=4, norm="none", spectral_norm=True)
    again.load_state_dict(state)
    d.eval(), again.eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(d(x), again(x))


def test_dcgan_init_and_bad_options():
    g = DCGANGenerator(latent_dim=4, out_channels=1, image_size=8, base_channels=64, init_std=0.02)
    conv = g.net[0]
    assert abs(conv.weight.std().item() - 0.02) < 0.004
    with pytest.raises(ConfigError, match="image size 24"):
        DCGANGenerator(latent_dim=4, out_channels=1, image_size=24)
    with pytest.raises(ConfigError, match="norm='instance'"):
        DCGANDiscriminator(in_channels=1, image_size=8, norm="instance")


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("n_critic", [1, 3, 5])
def test_optimizer_step_counts_under_n_critic(n_critic):
    model = tiny_gan(loss="wgan_gp", n_critic=n_critic)
    trainer = fit(model, batches=10)
    opt_g, opt_d = (o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers)
    # Adam counts its own steps per parameter: an independent check of the family's counters.
    adam_steps = lambda opt: {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]}  # noqa: E731
    assert adam_steps(opt_d) == {10}
    assert adam_steps(opt_g) == {10 // n_critic}
    assert int(model.d_steps) == 10 and int(model.g_steps) == 10 // n_critic
    assert trainer.global_step == 10 + 10 // n_critic  # Lightning counts every optimiser step


def test_separate_learning_rates_ttur():
    from functools import partial

    model = tiny_gan(g_optimizer=partial(torch.optim.Adam, lr=1e-4, betas=(0.0, 0.9)),
                     d_optimizer=partial(torch.optim.Adam, lr=4e-4, betas=(0.0, 0.9)))
    opt_g, opt_d = model.configure_optimizers()
    assert [g["lr"] for g in opt_g.param_groups] == [1e-4] and [g["lr"] for g in opt_d.param_groups] == [4e-4]
    assert {id(p) for p in model.generator.parameters()} == {id(p) for g in opt_g.param_groups for p in g["params"]}
    assert {id(p) for p in model.discriminator.parameters()} == {id(p) for g in opt_d.param_groups for p in g["params"]}


def test_ema_follows_the_generator_with_warmup():
    model = tiny_gan(ema_decay=0.9)
    before = [p.clone() for p in model.generator_ema.parameters()]
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(1.0)
    model.set_counter("g_steps", 1)  # warm-up decay: min(0.9, 2 / 11)
    model.update_ema()
    decay = 2 / 11
    for b, e, g in zip(before, model.generator_ema.parameters(), model.generator.parameters()):
        torch.testing.assert_close(e, decay * b + (1 - decay) * g)
    model.set_counter("g_steps", 1000)  # past the warm-up: the configured decay
    before = [p.clone() for p in model.generator_ema.parameters()]
    model.update_ema()
    for b, e, g in zip(before, model.generator_ema.parameters(), model.generator.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * g)


def test_training_moves_raw_and_ema_generators_apart_from_init():
    model = tiny_gan()
    z = torch.randn(4, 8)
    model.eval()
    start = model.decode(z).clone()
    model.train()
    fit(model, batches=6)
    model.eval()
    ema, raw = model.decode(z), model.decode(z, use_ema=False)
    assert not torch.allclose(ema, start) and not torch.allclose(ema, raw)
    assert torch.isfinite(ema).all() and ema.abs().max() <= 1


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_options_apply():
    model = tiny_gan().eval()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = model.sample(6, generator=gen()), model.sample(6, generator=gen())
    torch.testing.assert_close(a, b)
    assert a.shape == (6, 1, 8, 8)
    z = model.prior(6, gen())
    torch.testing.assert_close(model.decode(z, truncation=0.5), model.decode(0.5 * z))  # psi-scaling
    torch.testing.assert_close(model.sample(6, generator=gen(), truncation=0.5), model.decode(0.5 * z))
    torch.testing.assert_close(model.decode(z, use_ema=False), model.generator(z))
    torch.testing.assert_close(model.decode(z), model.generator_ema(z))
    info = model.sampling_info(truncation=0.7)
    assert info["weights"] == "ema" and info["truncation"] == 0.7 and "psi" in info["truncation_method"]
    assert model.sampling_info(use_ema=False)["weights"] == "raw"
    assert set(model.supported_sample_options) == {"use_ema", "truncation"} and model.has_latent


@pytest.mark.parametrize("psi", [0, -0.5, 1.5, "big"])
def test_bad_truncation_is_a_config_error(psi):
    with pytest.raises(ConfigError, match="truncation="):
        tiny_gan().sample(2, truncation=psi)


def test_use_ema_without_an_ema_generator():
    model = tiny_gan(ema_decay=None).eval()
    assert model.generator_ema is None
    assert model.sampling_info()["weights"] == "raw"
    assert model.sample(2).shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError, match="use_ema=true"):
        model.sample(2, use_ema=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="norm=batch"):
        tiny_gan(loss="wgan_gp", d_norm="batch")
    with pytest.raises(ConfigError, match="n_critic=0"):
        tiny_gan(n_critic=0)
    with pytest.raises(ConfigError, match="ema_decay=1.5"):
        tiny_gan(ema_decay=1.5)
    with pytest.raises(ConfigError, match="g_optimizer"):
        tiny_gan(optimizer=torch.optim.Adam)
    with pytest.raises(ConfigError, match="generator makes images"):
        GAN(generator=DCGANGenerator(latent_dim=8, out_channels=1, image_size=16, base_channels=4),
            discriminator=DCGANDiscriminator(in_channels=1, image_size=8, base_channels=4, norm="layer"),
            image_shape=(1, 8, 8), latent_dim=8)


# ----------------------------------------------------------------------------- the real configs
@pytest.mark.parametrize(("preset", "loss", "norm", "sn", "n_critic"), [
    ("dcgan", "bce", "batch", False, 1), ("wgan_gp", "wgan_gp", "layer", False, 5), ("sngan", "hinge", "none", True, 1),
])
def test_named_presets(compose_cfg, preset, loss, norm, sn, n_critic):
    cfg = compose_cfg("train", [f"model={preset}"])
    model = instantiate(cfg.model)
    assert (model.loss, model.discriminator.norm, model.discriminator.spectral_norm, model.n_critic) == (
        loss, norm, sn, n_critic)
    assert model.monitor == cfg.callbacks.checkpoint.monitor == "train/diversity_gap"


@pytest.mark.parametrize("loss", ["bce", "wgan_gp", "hinge"])
def test_fast_dev_run_each_loss(compose_cfg, loss):
    """The real train job on the embedded digits, one batch, for model=gan model.loss=<loss>."""
    from gencli.jobs.train import train

    cfg = compose_cfg("train", [
        "model=gan", f"model.loss={loss}", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
        "trainer.fast_dev_run=true", "callbacks=minimal", "logger=none", "data.batch_size=16",
    ])
    train(cfg)
    # fast_dev_run keeps no checkpoint, but the job still writes its metrics with the losses it logged
    import json
    from pathlib import Path

    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "train/diversity"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert ("train/gp" in metrics) == (loss == "wgan_gp")
