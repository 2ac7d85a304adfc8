"""The global batch over devices and accumulation, and the learning rate that follows it (gencli.scaling)."""

from __future__ import annotations

import functools
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from gencli.errors import ConfigError
from gencli.scaling import apply_batch_plan, per_device_batch, plan_batch, scale_learning_rates


@pytest.mark.parametrize("world, accumulate, expected", [(1, 1, 128), (8, 1, 16), (1, 4, 32), (2, 2, 32)])
def test_the_global_batch_is_split_over_devices_and_micro_batches(world, accumulate, expected):
    assert per_device_batch(128, world, accumulate) == expected
    plan = plan_batch(128, 999, world, accumulate)
    assert plan.per_device == expected and plan.global_size == 128 and plan.lr_factor == 1.0


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ConfigError, match=r"data.global_batch_size=100 cannot be split evenly over 3 device\(s\) x "
                                          r"trainer.accumulate_grad_batches=1.*multiple of 3 \(e.g. 99\)"):
        per_device_batch(100, 3, 1)
    with pytest.raises(ConfigError, match="multiple of 16"):
        per_device_batch(8, 8, 2)


def test_learning_rate_rules():
    assert plan_batch(None, 64, 4, 1, "linear", 128).lr_factor == 2.0  # 256 / 128
    assert plan_batch(None, 64, 4, 1, "sqrt", 128).lr_factor == pytest.approx(math.sqrt(2))
    assert plan_batch(None, 64, 4, 1, "none", 128).lr_factor == 1.0
    assert plan_batch(128, 64, 4, 1, "linear", 128).lr_factor == 1.0  # the global batch is the reference one
    with pytest.raises(ConfigError, match="lr_scaling=linear needs lr_reference_batch"):
        plan_batch(None, 64, 2, 1, "linear", None)


def test_every_optimiser_of_a_family_is_scaled():
    model = SimpleNamespace(g_optimizer_factory=functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999)),
                            d_optimizer_factory=functools.partial(torch.optim.Adam, lr=1e-4))
    changed = scale_learning_rates(model, 2.0)
    assert changed == {"g_optimizer_factory": (2e-4, 4e-4), "d_optimizer_factory": (1e-4, 2e-4)}
    assert model.g_optimizer_factory.keywords == {"lr": 4e-4, "betas": (0.5, 0.999)}


def fake_trainer(world: int, accumulate: int):
    return SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate)


def test_the_cifar10_recipes_keep_the_papers_batch_on_any_devices(compose_cfg):
    for experiment, batch in (("ddpm_cifar10", 128), ("dcgan_cifar10", 128), ("wgan_gp_cifar10", 64)):
        cfg = compose_cfg("train", [f"experiment={experiment}", "trainer=ddp_cpu", "trainer.devices=2",
                                    "trainer.accumulate_grad_batches=2"])
        assert cfg.data.global_batch_size == batch and cfg.lr_reference_batch == batch
        datamodule = instantiate(cfg.data)
        model = SimpleNamespace(run_config={"data": {}})
        plan = apply_batch_plan(cfg, fake_trainer(2, 2), datamodule, model)
        assert datamodule.batch_size == batch // 4 == cfg.data.batch_size and plan.global_size == batch
        assert model.run_config["batch"]["global"] == batch and model.run_config["data"]["batch_size"] == batch // 4


def test_lr_scaling_reaches_the_model_and_none_warns(compose_cfg, caplog):
    cfg = compose_cfg("train", ["model=dcgan", "data.batch_size=32", "lr_scaling=linear", "lr_reference_batch=32"])
    model = instantiate(cfg.model)
    model.run_config = {"data": {}}
    datamodule = SimpleNamespace(batch_size=32)
    plan = apply_batch_plan(cfg, fake_trainer(4, 1), datamodule, model)
    assert plan.lr_factor == 4 and datamodule.batch_size == 32
    assert model.g_optimizer_factory.keywords["lr"] == pytest.approx(4 * cfg.model.g_optimizer.lr)
    assert model.configure_optimizers()[0].param_groups[0]["lr"] == pytest.approx(4 * cfg.model.g_optimizer.lr)
    with open_dict(cfg):
        cfg.lr_scaling = "none"
    with caplog.at_level(logging.WARNING, logger="gencli.scaling"):
        apply_batch_plan(cfg, fake_trainer(4, 1), SimpleNamespace(batch_size=32), instantiate(cfg.model))
    assert "global batch 128" in caplog.text and "lr_scaling=none keeps it" in caplog.text


def test_a_per_device_batch_beside_a_global_one_is_refused(compose_cfg, monkeypatch):
    import gencli.scaling as scaling

    cfg = compose_cfg("train", ["experiment=ddpm_cifar10", "data.batch_size=32"])
    monkeypatch.setattr(scaling, "command_line_batch_size", lambda: "32")
    with pytest.raises(ConfigError, match=r"data.batch_size=32 and data.global_batch_size=128 both set the batch"):
        apply_batch_plan(cfg, fake_trainer(1, 1), instantiate(cfg.data), SimpleNamespace())


def test_a_small_run_trains_with_the_derived_batch(compose_cfg, tmp_path):
    """The real train job: digits with a global batch of 32 over 2 accumulated micro-batches trains at 16 a batch."""
    import json

    from gencli.jobs.train import train

    cfg = compose_cfg("train", ["data.global_batch_size=32", "trainer.accumulate_grad_batches=2", "trainer.max_steps=2",
                                "callbacks=minimal", "logger=none", "trainer.limit_val_batches=1",
                                "callbacks.sample_grid.n=4"])
    train(cfg)
    from pathlib import Path

    from gencli.io import load_checkpoint

    stored = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["gencli"]["config"]
    assert stored["data"]["batch_size"] == 16 and stored["batch"]["global"] == 32
    assert stored["batch"]["accumulate_grad_batches"] == 2
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_a_data_module_without_a_batch_size_is_left_alone_unless_a_global_batch_is_asked(compose_cfg):
    cfg = compose_cfg("train", [])
    plan = apply_batch_plan(cfg, fake_trainer(2, 1), SimpleNamespace(), SimpleNamespace())
    assert plan.lr_factor == 1.0
    with open_dict(cfg):
        cfg.data.global_batch_size = 64
    with pytest.raises(ConfigError, match="need a data module with an integer batch_size"):
        apply_batch_plan(cfg, fake_trainer(2, 1), SimpleNamespace(), SimpleNamespace())
