"""hardware.host_sync=log: no GPU->CPU syncs in the training step between logging steps, the same weights as the
per-step checks, and a NaN still stops the run with the weights from before it (issue 14).

There is no GPU here, so a "sync" is counted as what causes one on a GPU: a tensor read into Python
(``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.cpu()``) during a training step. The data
loader's own reads (CPU tensors on every device) are left out.
"""

from __future__ import annotations

import logging
import traceback
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from gencli.callbacks.non_finite import NonFiniteGuard
from gencli.errors import ConfigError, RuntimeFailure
from gencli.families.base import logging_step

READS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu")
TINY = {
    "ddpm": ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.ch_mult=[1,2]", "data.image_size=8", "data.batch_size=8"],
    "dcgan": ["model=dcgan", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
              "data.image_size=8", "data.batch_size=8"],
}


@pytest.fixture(autouse=True)
def quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class TensorReads:
    """Counts tensor -> Python reads while ``on`` (monkeypatched onto torch.Tensor), and where they came from."""

    def __init__(self, monkeypatch):
        self.on = False
        self.sites: list[str] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self.counting(name, getattr(torch.Tensor, name)))

    def counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.on:
                stack = traceback.extract_stack(limit=12)[:-1]
                if not any("torch/utils/data" in frame.filename for frame in stack):  # the loader's CPU tensors
                    self.sites.append(f"{name} at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                                                  for f in reversed(stack[-4:])))
            return original(tensor, *args, **kwargs)
        return read


class StepReads(L.Callback):
    """Per training batch: the reads between its start and its end, and whether it was a logging step."""

    def __init__(self, reads: TensorReads):
        self.reads, self.steps = reads, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.reads.sites = []
        self.reads.on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reads.on = False
        self.steps.append((trainer.global_step, logging_step(trainer), list(self.reads.sites)))


def train_job(compose_cfg, family: str, extra: list[str], callbacks: list) -> None:
    """The real ``gencli train`` job (its default callbacks, Rich bar and CSV logger included) with ``callbacks`` added."""
    from gencli.jobs.train import train

    cfg = compose_cfg("train", [*TINY[family], "trainer.accelerator=cpu", "trainer.max_steps=24",
                                "trainer.log_every_n_steps=8", "trainer.limit_val_batches=0",
                                "callbacks.sample_grid.n=4", *extra])
    fit = L.Trainer.fit

    def fit_with(self, *args, **kwargs):
        self.callbacks.extend(callbacks)
        return fit(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L.Trainer, "fit", fit_with)
        train(cfg)


@pytest.mark.parametrize("family", ["ddpm", "dcgan"])
def test_no_tensor_reads_between_logging_steps(compose_cfg, monkeypatch, family):
    reads = TensorReads(monkeypatch)
    steps = StepReads(reads)
    train_job(compose_cfg, family, ["hardware.optimizer_kernel=fused", "hardware.host_sync=log"], [steps])
    quiet = [(step, sites) for step, logging, sites in steps.steps[1:] if not logging]
    assert len(quiet) >= 8, steps.steps
    assert all(not sites for _, sites in quiet), [q for q in quiet if q[1]][:3]


def test_the_per_step_checks_are_counted(compose_cfg, monkeypatch):
    """The counting sees syncs where they are: host_sync=step reads the guard's finite checks at every step."""
    reads = TensorReads(monkeypatch)
    steps = StepReads(reads)
    train_job(compose_cfg, "ddpm", ["hardware.optimizer_kernel=fused", "hardware.host_sync=step"], [steps])
    quiet = [sites for _, logging, sites in steps.steps[1:] if not logging]
    assert quiet and all(any("non_finite.py" in site for site in sites) for sites in quiet)


# ----------------------------------------------------------------------------- the same maths
def fit_tiny(compose_cfg, family: str, host_sync: str, steps: int, kernel: str = "fused", poison_at: int | None = None):
    """A tiny family trained ``steps`` optimiser steps under a real Trainer with the NonFiniteGuard; with
    ``poison_at``, the batch of that index holds a NaN. Returns (model, the RuntimeFailure or None)."""
    cfg = compose_cfg("train", [*TINY[family], f"hardware.optimizer_kernel={kernel}", f"hardware.host_sync={host_sync}"])
    L.seed_everything(0, verbose=False)
    model = instantiate(cfg.hardware).apply(instantiate(cfg.model))

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if poison_at is not None and batch_idx >= poison_at:
                batch[0][0, 0, 0, 0] = float("nan")

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=5, callbacks=[NonFiniteGuard(save_if_missing=False), Poison()])
    try:
        trainer.fit(model, datamodule=instantiate(cfg.data))
    except RuntimeFailure as failure:
        return model, failure
    return model, None


BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def assert_same_state(a, b, batch_norm_statistics: bool = True):
    """Bitwise the same state (weights, EMA weights, step counters); BatchNorm's running statistics too, unless
    ``batch_norm_statistics=False``: forward passes update them, also those of steps skipped on the device."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    compared = [k for k in sa if batch_norm_statistics or not k.endswith(BATCH_NORM_STATISTICS)]
    different = [k for k in compared if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("family", ["ddpm", "dcgan"])
def test_checks_on_the_device_train_bitwise_the_same(compose_cfg, family):
    steps = 12 if family == "ddpm" else 24  # (a GAN batch is two optimiser steps)
    per_step, failure = fit_tiny(compose_cfg, family, "step", steps)
    assert failure is None
    on_device, failure = fit_tiny(compose_cfg, family, "log", steps)
    assert failure is None
    assert_same_state(per_step, on_device)


@pytest.mark.parametrize("family", ["ddpm", "dcgan"])
def test_a_nan_is_skipped_on_the_device_then_stops_the_run(compose_cfg, family):
    """The batch of index 3 holds a NaN: under host_sync=log that step and every later one are skipped on the device,
    the run stops at the next logging step naming batch 3's step, and the weights (EMA and step counters included)
    are bitwise those of a run that stopped before it. (BatchNorm's running statistics went on tracking the skipped
    steps' forward passes of the same weights; a NaN reaching them is caught before any checkpoint is written.)"""
    per_batch = 1 if family == "ddpm" else 2
    failed, failure = fit_tiny(compose_cfg, family, "log", 40, poison_at=3)
    assert failure is not None
    bad_step = 3 * per_batch
    name = "diffusion loss" if family == "ddpm" else "discriminator loss"
    assert f"the {name} was NaN at step {bad_step}" in failure.message, failure.message
    assert "skipped on the device" in failure.message and "Likely cause: the input batch itself holds NaN" in failure.message
    stopped = int(failure.message.split("training stopped at step ")[1].split(" ")[0])
    assert bad_step < stopped <= 10, failure.message  # seen at a logging step (every 5), not at once
    before, failure = fit_tiny(compose_cfg, family, "step", bad_step)
    assert failure is None
    assert_same_state(failed, before, batch_norm_statistics=False)


def test_without_a_fused_optimiser_the_checks_stay_per_step(compose_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="gencli.callbacks.non_finite"):
        _, failure = fit_tiny(compose_cfg, "ddpm", "log", 20, kernel="foreach", poison_at=3)
    assert "hardware.host_sync=log needs optimisers that can skip a step" in caplog.text
    assert "optimizer_kernel=fused" in caplog.text
    assert failure is not None and "training stopped at step 3 " in failure.message and "the diffusion loss is NaN" in failure.message


# ----------------------------------------------------------------------------- the parts
def test_step_counters_are_read_once_and_again_after_a_load(compose_cfg):
    cfg = compose_cfg("train", TINY["ddpm"])
    model = instantiate(cfg.model)
    assert model.counter("ema_updates") == 0
    model.count_up("ema_updates")
    model.count_up("ema_updates")
    assert int(model.ema_updates) == 2 and model.counter("ema_updates") == 2
    state = model.state_dict()
    state["ema_updates"] = torch.tensor(7)
    model.load_state_dict(state)
    assert model.counter("ema_updates") == 7


def test_conditional_labels_are_checked_once_for_the_whole_data(compose_cfg):
    cfg = compose_cfg("train", [*TINY["ddpm"], "model.conditional=true", "model.num_classes=3"])
    model = instantiate(cfg.model)
    good = SimpleNamespace(train_set=SimpleNamespace(labels=torch.tensor([0, 1, 2])),
                           val_set=SimpleNamespace(labels=torch.tensor([2])))
    model.check_data_labels(good)
    assert model._labels_checked
    bad = SimpleNamespace(train_set=SimpleNamespace(labels=torch.tensor([0, -1, 2])), val_set=good.val_set)
    with pytest.raises(ConfigError, match=r"the training data holds labels \[-1, 0, 2\].*class subfolder"):
        model.check_data_labels(bad)
    model.check_data_labels(None)  # another kind of data module: every batch is checked instead
    assert not model._labels_checked
    with pytest.raises(ConfigError, match=r"a batch holds labels \[5\]"):
        model.batch_labels((torch.zeros(1, 1, 8, 8), torch.tensor([5])))


def test_the_guard_flags_fold_steps_on_the_device():
    from gencli.callbacks.non_finite import DeviceFlags

    flags = DeviceFlags(torch.device("cpu"))
    flags.see_loss(torch.tensor(0.5))
    assert float(flags.see_step(torch.tensor(False), 0)) == 0
    flags.see_loss(torch.tensor(float("inf")))
    assert float(flags.see_step(torch.tensor(False), 1)) == 1
    flags.see_loss(torch.tensor(0.5))
    assert float(flags.see_step(torch.tensor(False), 2)) == 1  # sticky: later steps are skipped too
    assert int(flags.first_step) == 1 and bool(flags.first_loss_bad) and float(flags.first_loss) == float("inf")
    ddp = DeviceFlags(torch.device("cpu"), world_size=2)
    ddp.see_loss(torch.tensor(float("nan")))
    # one rank's loss alone does not skip (the ranks' weights would part); the all-reduced gradients do
    assert float(ddp.see_step(torch.tensor(False), 0)) == 0 and bool(ddp.bad)
    assert float(ddp.see_step(torch.tensor(True), 1)) == 1


# ----------------------------------------------------------------------------- clipping with fused optimisers
def test_the_gpu_fast_profile_trains_a_clipped_ddpm(compose_cfg):
    """hardware=gpu_fast is bf16 autocast + fused Adam, and DDPM clips its gradients to norm 1: Lightning's own
    clipping refuses that pair, gencli's (families.base.clip_gradients) does not. Run on the CPU (compile and the
    loader workers off: the rest of the profile as it is)."""
    import json
    from pathlib import Path

    from gencli.jobs.train import train

    cfg = compose_cfg("train", [*TINY["ddpm"], "hardware=gpu_fast", "hardware.compile=false", "hardware.num_workers=0",
                                "hardware.pin_memory=false", "trainer.accelerator=cpu", "trainer.max_steps=3",
                                "callbacks=minimal", "callbacks.sample_grid.n=4", "logger=none",
                                "trainer.limit_val_batches=1"])
    assert cfg.model.grad_clip == 1.0 and cfg.trainer.precision == "bf16-mixed"
    train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["status"] == "completed"


def test_clipping_unscales_a_fused_optimiser_under_a_grad_scaler():
    from gencli.families.base import clip_gradients

    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.Adam([weight], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    module = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)))
    scaler.scale((weight * weight).sum() / 2).backward()  # gradient = weight = (3, 4), norm 5, scaled by 1024
    clip_gradients(module, optimizer, 1.0)
    torch.testing.assert_close(weight.grad, torch.tensor([0.6, 0.8]))  # unscaled, then clipped to norm 1
    scaler.step(optimizer)  # not unscaled twice
    scaler.update()
    assert not torch.equal(weight.detach(), torch.tensor([3.0, 4.0]))
    with pytest.raises(ConfigError, match="gradient_clip_algorithm=max"):
        clip_gradients(SimpleNamespace(_trainer=None), optimizer, 1.0, "max")
