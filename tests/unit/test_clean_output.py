"""Clean output: no Lightning adverts or warnings that do not apply, no FLOPs column of zeros, learning rates named
after what they train, no empty run folder after a failed command, a warning for a GPU profile on a CPU trainer,
and a note wherever bits/dim is not the paper-comparable kind."""

from __future__ import annotations

import csv
import logging
import os
import warnings

import lightning as L
import pytest
import torch
from torch import nn

import gencli.jobs  # noqa: F401 - installs the output filters, as every job does
from gencli.callbacks import LearningRateMonitor, ModelSummary
from gencli.hardware import HardwareSettings


class TwoOptimisers(L.LightningModule):
    """A GAN's shape: two nets, two optimisers of the same class, manual optimisation, no validation_step."""

    optimizer_roles = ("generator", "discriminator")

    def __init__(self, roles: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.g, self.d = nn.Linear(2, 2), nn.Linear(2, 1)
        if not roles:
            self.optimizer_roles = ()

    def training_step(self, batch, batch_idx):
        for opt, net in zip(self.optimizers(), (self.g, self.d)):
            opt.zero_grad()
            self.manual_backward(net(batch[0]).pow(2).mean())
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.g.parameters(), lr=1e-3), torch.optim.Adam(self.d.parameters(), lr=2e-4)]


def loader():
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    return torch.utils.data.DataLoader(data, batch_size=4)


def fit(tmp_path, module, callbacks):
    trainer = L.Trainer(max_steps=4, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        callbacks=callbacks, enable_progress_bar=False, log_every_n_steps=1,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    if not (tmp_path / "metrics.csv").exists():  # nothing logged
        return []
    with open(tmp_path / "metrics.csv") as f:
        return next(csv.reader(f))


def test_learning_rates_are_named_after_what_they_train(tmp_path):
    columns = fit(tmp_path / "gan", TwoOptimisers(), [LearningRateMonitor(logging_interval="step")])
    assert "lr/generator" in columns and "lr/discriminator" in columns
    assert not [c for c in columns if c.startswith("lr-")]
    # without roles, two optimisers keep Lightning's names (nothing to name them after); one optimiser is just lr
    columns = fit(tmp_path / "plain", TwoOptimisers(roles=False), [LearningRateMonitor(logging_interval="step")])
    assert "lr-Adam" in columns and "lr-Adam-1" in columns


def test_gan_family_declares_its_optimiser_roles():
    from gencli.families.gan import GAN

    assert GAN.optimizer_roles == ("generator", "discriminator")


def test_no_litlogger_advert_no_val_loop_warning_and_no_flops_zeros(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user sees, with gencli's own filters kept in front
        import importlib

        importlib.reload(gencli.jobs)
        fit(tmp_path, TwoOptimisers(), [ModelSummary()])
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "litlogger" in m or "Tip:" in m], messages
    assert not [m for m in messages if "already configured with model summary" in m]
    assert not [w for w in caught if "validation_step" in str(w.message)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    assert "Name" in out and "Params" in out and "trainable parameters" in out
    assert "FLOPs" not in out and "Mode" not in out


def test_default_callbacks_use_the_named_monitor_and_summary(compose_cfg):
    cfg = compose_cfg("train", [])
    assert cfg.callbacks.lr_monitor._target_ == "gencli.callbacks.LearningRateMonitor"
    assert cfg.callbacks.model_summary._target_ == "gencli.callbacks.ModelSummary"


def test_a_gpu_profile_on_a_cpu_trainer_is_named_with_the_fix():
    gpu = HardwareSettings(precision="bf16-mixed", pin_memory=True, num_workers=(os.cpu_count() or 1) + 6)
    message = gpu.mismatch("cpu", "gpu_fast")
    assert message.startswith("hardware=gpu_fast is made for a GPU but trainer.accelerator=cpu")
    for text in ("precision=bf16-mixed", "pin_memory=true", f"num_workers={(os.cpu_count() or 1) + 6}",
                 "hardware=cpu_fast", "trainer=gpu"):
        assert text in message
    assert gpu.mismatch("gpu", "gpu_fast") is None and gpu.mismatch("auto", "gpu_fast") is None
    assert HardwareSettings().mismatch("cpu", "default") is None
    assert HardwareSettings(num_workers=2, channels_last=True).mismatch("cpu", "cpu_fast") is None


def test_bits_per_dim_say_which_kind_they_are(compose_cfg):
    from hydra.utils import instantiate

    from gencli.families.vae import VAE

    cfg = compose_cfg("train", ["model=vae"])
    vae = instantiate(cfg.model)
    assert isinstance(vae, VAE) and vae.likelihood == "bernoulli"
    (note,) = vae.score_notes()
    assert "NOT comparable" in note and "bernoulli" in note
    vae.likelihood = "gaussian"
    assert "approximation" in vae.score_notes()[0]


@pytest.mark.parametrize("verb", ["sample", "eval"])
def test_a_command_that_fails_before_starting_leaves_no_run_folder(run_gencli, tmp_path, verb):
    result = run_gencli(verb, "ckpt=/nonexistent/last.ckpt")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "outputs" / verb).exists(), list((tmp_path / "outputs").rglob("*"))


def test_a_failed_run_with_outputs_keeps_its_folder(tmp_path):
    """Only folders holding nothing but records are removed: anything a job wrote (or an earlier run) stays."""
    from omegaconf import OmegaConf

    from gencli.jobs.common import only_bookkeeping

    cfg = OmegaConf.create({"task_name": "train"})
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "train.log").write_text("")
    (run / "job.json").write_text("{}")
    assert only_bookkeeping(run, cfg)
    (run / "checkpoints").mkdir()
    assert not only_bookkeeping(run, cfg)
