"""The GANMonitor callback: the diversity ratio, the mode-collapse warning and the D-wins warning."""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gencli.callbacks.gan_monitor import GANMonitor, mean_pairwise_distance
from gencli.families.gan import GAN
from gencli.nets.dcgan import DCGANDiscriminator

SIZE = 8


def real_images(n: int = 64) -> torch.Tensor:
    """Varied 'real' images: each a random bright rectangle on a dark background."""
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(n, 1, SIZE, SIZE)
    for i in range(n):
        r, c = torch.randint(0, SIZE - 3, (2,), generator=g).tolist()
        h, w = torch.randint(2, 4, (2,), generator=g).tolist()
        x[i, :, r : r + h, c : c + w] = 1.0
    return x


class CollapsedGenerator(nn.Module):
    """A generator forced to collapse: it ignores its latent and makes one (trainable) image."""

    latent_dim = 4

    def __init__(self, fill: float = 0.0):
        super().__init__()
        self.image = nn.Parameter(torch.full((1, 1, SIZE, SIZE), fill))

    def forward(self, z):
        return torch.tanh(self.image).expand(len(z), -1, -1, -1) + 0 * z.sum()


class LookupGenerator(nn.Module):
    """A healthy generator: each latent picks one of the real images (so samples vary like real data)."""

    latent_dim = 4

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.register_buffer("images", images)
        self.codes = nn.Parameter(torch.randn(len(images), 4, generator=torch.Generator().manual_seed(1)))

    def forward(self, z):
        index = (z @ self.codes.T).argmax(1)
        return self.images[index] + 0 * self.codes.sum()


def run(generator: nn.Module, monitor: GANMonitor, batches: int = 24, **gan_options) -> GAN:
    torch.manual_seed(0)
    model = GAN(generator=generator, discriminator=DCGANDiscriminator(1, SIZE, base_channels=8, norm="none"),
                image_shape=(1, SIZE, SIZE), latent_dim=4, ema_decay=None, **{"loss": "bce", **gan_options})
    data = real_images()
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=16, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2 * batches, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[monitor])
    trainer.fit(model, train_dataloaders=loader)
    return model


@pytest.fixture(autouse=True)
def quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def test_mean_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(x) == pytest.approx((5 + 0 + 5) / 3)
    assert mean_pairwise_distance(torch.zeros(4, 1, 2, 2)) == 0.0


def test_collapse_warning_fires_on_a_collapsed_generator(caplog):
    monitor = GANMonitor(every_n_steps=4, n=32, warmup_steps=8, collapse_ratio=0.4, d_win_checks=3)
    with caplog.at_level(logging.WARNING, logger="gencli"):
        run(CollapsedGenerator(), monitor)
    assert monitor.history and all(ratio < 1e-3 for _, ratio in monitor.history)
    collapse = [w for w in monitor.warnings if w.startswith("Mode collapse")]
    assert len(collapse) == 1, monitor.warnings  # warned once, although every check is below the threshold
    assert "nearly the same image" in collapse[0] and "model=wgan_gp" in collapse[0]
    assert collapse[0] in caplog.text
    # Nor does it warn during the warm-up: the first warning is at the first check at or past step 8.
    assert "at step 8:" in collapse[0]


def test_collapse_warning_silent_on_a_healthy_generator(caplog):
    monitor = GANMonitor(every_n_steps=4, n=32, warmup_steps=0, collapse_ratio=0.4, d_win_checks=3)
    with caplog.at_level(logging.WARNING, logger="gencli"):
        run(LookupGenerator(real_images()), monitor)
    ratios = [ratio for _, ratio in monitor.history]
    assert len(ratios) >= 10 and min(ratios) > 0.7 and max(ratios) < 1.3
    assert monitor.warnings == [] and caplog.text == ""


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_discriminator_win_warning(loss):
    """A fast D facing a frozen constant fake becomes sure of every image; it is reported once, after K checks."""
    monitor = GANMonitor(every_n_steps=4, n=16, warmup_steps=0, collapse_ratio=0.0, d_win_checks=3)
    run(CollapsedGenerator(fill=1.0), monitor, batches=40, loss=loss,
        g_optimizer=partial(torch.optim.SGD, lr=0.0), d_optimizer=partial(torch.optim.Adam, lr=0.01))
    wins = [w for w in monitor.warnings if w.startswith("The discriminator is winning outright")]
    assert len(wins) == 1 and "3 checks in a row" in wins[0] and "model.d_optimizer.lr" in wins[0]


def test_no_discriminator_win_warning_when_d_cannot_tell():
    monitor = GANMonitor(every_n_steps=4, n=16, warmup_steps=0, d_win_checks=2)
    run(LookupGenerator(real_images()), monitor, batches=40, d_optimizer=partial(torch.optim.Adam, lr=0.01))
    assert monitor.warnings == []


def test_diversity_is_logged_for_the_checkpoint_monitor():
    monitor = GANMonitor(every_n_steps=4, n=16, warmup_steps=12)
    model = run(LookupGenerator(real_images()), monitor, batches=10)
    metrics = model.trainer.callback_metrics
    assert 0.7 < float(metrics["train/diversity"]) < 1.3
    assert float(metrics["train/diversity_gap"]) == pytest.approx(abs(torch.log(metrics["train/diversity"]).item()))


def test_monitor_ignores_families_that_do_not_opt_in():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = GANMonitor(every_n_steps=1, warmup_steps=0)
    data = TensorDataset(torch.zeros(8, 1))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(Plain(), train_dataloaders=DataLoader(data, batch_size=2))
    assert monitor.history == [] and "train/diversity" not in trainer.callback_metrics
