"""The Throughput callback: images/s and optimiser steps/s after a warm-up, validation paused out, the device
synchronised only at the window's edges, one log line, and a report a run without enough batches still gets."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gencli.callbacks import throughput as tp
from gencli.callbacks.throughput import Throughput, batch_images
from gencli.errors import ConfigError


class FakeClock:
    """A clock that advances only when the test says: each training batch takes 0.5 s, each validation 7 s."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tiny(L.LightningModule):
    def __init__(self, clock: FakeClock, manual: bool = False):
        super().__init__()
        self.clock, self.layer = clock, torch.nn.Linear(4, 1)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        self.clock.t += 0.5
        loss = self.layer(batch[0]).pow(2).mean()
        if self.automatic_optimization:
            return loss
        for opt in self.optimizers():  # two optimiser steps per batch, as a GAN takes
            opt.zero_grad()
            self.manual_backward(self.layer(batch[0]).pow(2).mean())
            opt.step()

    def validation_step(self, batch, batch_idx):
        self.clock.t += 7.0 / 2  # two validation batches

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.SGD(self.parameters(), lr=0.01)
        return [torch.optim.SGD(self.parameters(), lr=0.01), torch.optim.SGD(self.parameters(), lr=0.01)]


class SlowEnd(L.Callback):
    """End-of-training work (a final checkpoint, a sample grid): 30 s that are not training."""

    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_train_end(self, trainer, pl_module):
        self.clock.t += 30.0


def fit(cb: Throughput, clock: FakeClock, batches: int, batch: int = 6, manual: bool = False, val: bool = False,
        max_steps: int = -1):
    data = TensorDataset(torch.randn(batches * batch, 4), torch.zeros(batches * batch))
    loader = DataLoader(data, batch_size=batch)
    val_loader = DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4)), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[SlowEnd(clock), cb], max_steps=max_steps,
                        num_sanity_val_steps=2 if val else 0, limit_val_batches=2 if val else 0,
                        val_check_interval=5 if val else None)
    trainer.fit(Tiny(clock, manual), train_dataloaders=loader, val_dataloaders=val_loader if val else None)
    return trainer


def test_images_and_steps_per_second_after_warmup(caplog):
    clock = FakeClock()
    cb = Throughput(warmup_steps=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="gencli.callbacks.throughput"):
        fit(cb, clock, batches=13, batch=6)
    r = cb.report
    # 10 timed batches of 0.5 s each: 60 images in 5 s
    assert r["timed_batches"] == 10 and r["warmup_batches"] == 3 and r["images"] == 60
    assert r["seconds"] == pytest.approx(5.0)
    assert r["images_per_s"] == pytest.approx(12.0)
    assert r["optimizer_steps_per_s"] == pytest.approx(2.0) and r["batches_per_s"] == pytest.approx(2.0)
    assert r["validation_excluded_s"] == 0
    lines = [m for m in caplog.messages if m.startswith("training throughput:")]
    assert lines == ["training throughput: 12.0 images/s, 2.00 optimiser steps/s, 2.00 batches/s (10 batches after 3 "
                     "warm-up, 5.0 s)"]


def test_validation_is_paused_out_and_gan_steps_count_twice():
    clock = FakeClock()
    cb = Throughput(warmup_steps=2, clock=clock)
    fit(cb, clock, batches=12, batch=4, manual=True, val=True)  # validation after batches 5 and 10 (+ sanity)
    r = cb.report
    assert r["timed_batches"] == 10 and r["images"] == 40
    # sanity validation is before the window; the two in the window (7 s each) are left out
    assert r["validation_excluded_s"] == pytest.approx(14.0)
    assert r["seconds"] == pytest.approx(5.0)
    assert r["images_per_s"] == pytest.approx(8.0)
    assert r["optimizer_steps_per_s"] == pytest.approx(4.0)  # two optimiser steps per batch


def test_max_steps_ends_the_window_at_the_last_batch():
    clock = FakeClock()
    cb = Throughput(warmup_steps=1, clock=clock)
    fit(cb, clock, batches=20, batch=2, max_steps=9)
    assert cb.report["timed_batches"] == 8 and cb.report["seconds"] == pytest.approx(4.0)


def test_too_few_batches_says_why():
    clock = FakeClock()
    cb = Throughput(warmup_steps=20, clock=clock)
    fit(cb, clock, batches=5)
    assert cb.report["images_per_s"] is None and "5 training batches" in cb.report["reason"]
    assert "not measured" in Throughput.line(cb.report)


def test_device_synchronised_only_at_the_window_edges(monkeypatch):
    calls = []
    monkeypatch.setattr(tp, "synchronize", lambda device: calls.append(device))
    clock = FakeClock()
    fit(Throughput(warmup_steps=2, clock=clock), clock, batches=30)
    assert len(calls) == 2  # start and end, not per step


def test_batch_images_reads_any_batch_layout():
    x = torch.zeros(5, 3, 2, 2)
    assert batch_images(x) == 5 and batch_images((x, torch.zeros(5))) == 5
    assert batch_images({"image": x}) == 5 and batch_images(torch.arange(7)) == 7 and batch_images("?") == 0


def test_negative_warmup_is_refused_by_the_schema():
    from omegaconf import OmegaConf

    from gencli.schema import validate

    with pytest.raises(ConfigError, match="callbacks.throughput.warmup_steps=-1 is not valid: it must be >= 0"):
        validate(OmegaConf.create({"callbacks": {"throughput": {"_target_": "gencli.callbacks.Throughput",
                                                                 "warmup_steps": -1}}}), "train")


def test_default_callbacks_include_it():
    """conf/callbacks/default.yaml holds the callback (minimal keeps it); tests/unit/test_gpu_check.py's tiny run reads
    its report from a real `gencli train`'s metrics.json."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gencli.config import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="train", overrides=["callbacks=minimal"])
    cb = instantiate(cfg.callbacks.throughput)
    assert isinstance(cb, Throughput) and cb.warmup_steps == 20


def test_validation_after_the_last_batch_is_not_taken_off_the_window():
    """The end-of-epoch validation after the last training batch runs once the clock has stopped: only the one inside
    the window (after batch 5) is paused out. Taking both off left a window of 4 - 7 s (was clamped to 1e-9 s and
    reported 3.2e10 images/s)."""
    clock = FakeClock()
    cb = Throughput(warmup_steps=2, clock=clock)
    fit(cb, clock, batches=10, batch=4, val=True)  # validation after batch 5 (timed) and batch 10 (after the window)
    r = cb.report
    assert r["timed_batches"] == 8 and r["images"] == 32
    assert r["validation_excluded_s"] == pytest.approx(7.0)
    assert r["seconds"] == pytest.approx(4.0)
    assert r["images_per_s"] == pytest.approx(8.0)


def test_a_window_without_positive_time_says_why_instead_of_a_number():
    """A clock that does not advance (or goes back) gives no rate: the report says why, it does not divide by a
    made-up 1e-9 s."""
    clock = FakeClock()

    class Frozen(Tiny):
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()  # the fake clock never moves

    cb = Throughput(warmup_steps=1, clock=clock)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Frozen(clock), train_dataloaders=DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4))
    r = cb.report
    assert r["images_per_s"] is None and r["timed_batches"] == 2
    assert "0 s" in r["reason"] and "clock" in r["reason"]
    assert "not measured" in Throughput.line(r)


def test_the_device_wait_is_the_shared_one():
    """The callback waits for the device with gencli.metrics.timing's helper (the one TimeSplit uses)."""
    from gencli.metrics import timing

    assert tp.synchronize is timing.synchronize
