"""The NonFiniteGuard: a NaN/inf stops the run with a clear message and leaves a loadable, finite checkpoint."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gencli.families.gan as gan_module
from gencli.callbacks import ModelCheckpoint
from gencli.callbacks.non_finite import NonFiniteGuard
from gencli.errors import RuntimeFailure
from gencli.io import load_checkpoint, restore_model

TINY_GAN = ["model=gan", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
            "callbacks=minimal", "logger=none", "data.batch_size=64", "callbacks.gan_monitor.every_n_steps=10"]


@pytest.fixture(autouse=True)
def quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def nan_after(monkeypatch, calls: int) -> None:
    """Make the GAN's discriminator loss NaN from its (calls+1)-th evaluation on."""
    real = gan_module.discriminator_loss
    count = {"n": 0}

    def poisoned(loss, d_real, d_fake):
        count["n"] += 1
        value = real(loss, d_real, d_fake)
        return value * float("nan") if count["n"] > calls else value

    monkeypatch.setattr(gan_module, "discriminator_loss", poisoned)


def checkpoint_path(message: str) -> Path:
    match = re.search(r"checkpoint is kept: (\S+\.ckpt)", message)
    assert match, message
    return Path(match.group(1))


def assert_finite_and_loadable(path: Path) -> dict:
    checkpoint = load_checkpoint(path)  # weights_only=True
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    model, _ = restore_model(path)
    images = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(images).all()
    return checkpoint


def test_nan_loss_stops_the_gan_and_keeps_the_last_good_checkpoint(compose_cfg, monkeypatch):
    from gencli.jobs.train import train

    cfg = compose_cfg("train", [*TINY_GAN, "trainer.max_epochs=3"])
    nan_after(monkeypatch, calls=30)  # 25 batches per epoch: epoch 0 ends and is checkpointed first
    with pytest.raises(RuntimeFailure) as failure:
        train(cfg)
    message = failure.value.message
    assert failure.value.exit_code == 1
    # 30 good batches (D and G steps: global step 60), then the 31st D loss is NaN
    assert "training stopped at step 60 (epoch 1, batch 5): the discriminator loss is NaN" in message
    assert "Likely cause: the GAN diverged" in message and "model.d_optimizer.lr" in message
    kept = checkpoint_path(message)
    assert kept == Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    checkpoint = assert_finite_and_loadable(kept)
    assert checkpoint["global_step"] == 50  # the end of epoch 0, not overwritten with anything later
    assert len(list(kept.parent.glob("best-*.ckpt"))) == 1


def test_nan_before_any_checkpoint_saves_the_last_finite_weights(compose_cfg, monkeypatch):
    from gencli.jobs.train import train

    cfg = compose_cfg("train", [*TINY_GAN, "trainer.max_epochs=1"])
    nan_after(monkeypatch, calls=3)
    with pytest.raises(RuntimeFailure) as failure:
        train(cfg)
    assert "training stopped at step 6 (epoch 0, batch 3)" in failure.value.message
    checkpoint = assert_finite_and_loadable(checkpoint_path(failure.value.message))
    assert checkpoint["global_step"] == 6


# ----------------------------------------------------------------------------- any family
class Regression(L.LightningModule):
    """A plain automatic-optimisation module; ``poison`` decides what goes wrong at which step."""

    def __init__(self, poison: str = "", at: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.poison, self.at = poison, at

    def training_step(self, batch, batch_idx):
        x = batch[0]
        loss = ((x * self.w).sum(1) - 1).pow(2).mean()
        if self.global_step >= self.at and self.poison == "loss":
            loss = loss + float("inf")
        if self.global_step >= self.at and self.poison == "gradient":
            loss = loss + torch.sqrt(self.w.sum() - self.w.sum().detach())  # value 0, gradient inf
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_regression(tmp_path, module, data=None, epochs=2):
    data = torch.rand(16, 4) if data is None else data
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[NonFiniteGuard(), checkpoints])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(data), batch_size=4))
    return trainer


def test_inf_loss_in_an_automatic_optimisation_family(tmp_path):
    with pytest.raises(RuntimeFailure, match=r"step 5 \(epoch 1, batch 1\): the loss is inf.*learning rate") as failure:
        fit_regression(tmp_path, Regression("loss", at=5))
    assert_kept = checkpoint_path(failure.value.message)
    assert torch.load(assert_kept, weights_only=True)["global_step"] == 4


def test_inf_gradient_with_a_finite_loss(tmp_path):
    with pytest.raises(RuntimeFailure, match=r"step 2 .*gradient of the loss holds NaN or inf values"):
        fit_regression(tmp_path, Regression("gradient", at=2))


def test_corrupt_input_is_named_as_the_cause(tmp_path):
    data = torch.rand(16, 4)
    data[9, 2] = float("nan")
    with pytest.raises(RuntimeFailure, match="input batch itself holds NaN or inf values"):
        fit_regression(tmp_path, Regression(), data=data)


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    module = Regression()
    trainer = fit_regression(tmp_path, module, epochs=1)
    last = Path(trainer.checkpoint_callback.last_model_path)
    before = last.read_bytes()
    with torch.no_grad():
        module.w[1] = float("nan")
    with pytest.raises(RuntimeFailure, match=r"the weights hold NaN or inf values \(w\), so this checkpoint was not written"):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == before


def test_last_checkpoint_is_the_latest_step_even_when_the_monitor_stops_improving(tmp_path):
    """Lightning 2.6 alone would leave last.ckpt at the best step (here the first epoch)."""

    class Worsening(Regression):
        def training_step(self, batch, batch_idx):
            self.log("score", float(self.current_epoch))  # mode=min: the first epoch stays the best
            return super().training_step(batch, batch_idx)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True,
                                  filename="best-{step}")
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints])
    trainer.fit(Worsening(), train_dataloaders=DataLoader(TensorDataset(torch.rand(8, 4)), batch_size=4))
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == ["best-step=2.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == trainer.global_step == 6
    assert Path(checkpoints.last_model_path).name == "last.ckpt"
