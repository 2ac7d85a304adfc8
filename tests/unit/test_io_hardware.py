"""File edges (atomic writes, grids, npz, slerp) and hardware settings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gencli.errors import ConfigError
from gencli.hardware import HardwareSettings
from gencli.io import atomic_write, from_uint8, image_grid, save_image_grid, save_npz, to_uint8
from gencli.latents import slerp
from gencli.nets.conv import ConvEncoder


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_write(target, "w") as f:
        f.write("whole")
    assert target.read_text() == "whole"
    # Readable like any other new file (mkstemp alone would leave it private to the owner).
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_uint8_round_trip_and_npz(tmp_path):
    images = torch.rand(3, 1, 4, 4) * 2 - 1
    array = to_uint8(images)
    assert array.shape == (3, 4, 4, 1) and array.dtype == np.uint8
    assert torch.allclose(from_uint8(array), images, atol=1 / 127.5)
    save_npz(tmp_path / "s.npz", array)
    assert np.array_equal(np.load(tmp_path / "s.npz")["images"], array)


def test_grid_layout_and_png(tmp_path):
    images = torch.rand(5, 3, 4, 4) * 2 - 1
    grid = image_grid(images, nrow=3, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    assert torch.equal(grid[:, 1:5, 6:10], images[1]) and torch.equal(grid[:, 6:10, 1:5], images[3])
    assert (grid[:, 0] == 1).all() and (grid[:, 6:10, 11:15] == 1).all()  # white separators and empty cells
    assert image_grid(torch.zeros(4, 1, 8, 8)).shape == (1, 2 * 10 + 2, 2 * 10 + 2)  # grey stays 1-channel
    path = save_image_grid(tmp_path / "g.png", torch.zeros(4, 1, 8, 8), scale=2)
    from PIL import Image

    assert Image.open(path).size == ((2 * 10 + 2) * 2, (2 * 10 + 2) * 2)


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (2, 5, 16)
    assert torch.allclose(path[:, 0], a, atol=1e-5) and torch.allclose(path[:, -1], b, atol=1e-5)
    # Between two equal-norm vectors slerp stays on the sphere (linear interpolation would not).
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    mid = slerp(a, b, torch.tensor([0.5]))[:, 0]
    assert torch.allclose(mid.norm(dim=1), a.norm(dim=1), rtol=1e-4)


def test_hardware_settings_apply_and_validate():
    model = torch.nn.Sequential(ConvEncoder(1, 8, 4, base_channels=4))
    HardwareSettings(channels_last=True, compile=True, matmul_precision="high").apply(model)
    assert torch.get_float32_matmul_precision() == "high"
    assert model[0].features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0]._compiled_call_impl is not None  # compiled in place: state_dict keys unchanged
    assert all(not k.startswith("_orig_mod") for k in model.state_dict())
    torch.set_float32_matmul_precision("highest")
    with pytest.raises(ConfigError, match="hardware.precision=8-bit"):
        HardwareSettings(precision="8-bit")
    with pytest.raises(ConfigError, match="num_workers"):
        HardwareSettings(num_workers=-1)


def test_keep_freed_memory_applies_on_glibc():
    import platform

    from gencli.hardware import keep_freed_memory

    assert keep_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("max_epochs, expected", [(-1, "Epoch 14"), (30, "Epoch 14/29")])
def test_progress_bar_epoch_text_for_open_ended_runs(max_epochs, expected):
    from types import SimpleNamespace

    from gencli.callbacks import TrainingProgressBar

    bar = TrainingProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    assert bar._get_train_description(14).strip() == expected


@pytest.mark.parametrize("kernel", ["single", "foreach", "fused"])
def test_optimizer_kernels_train_the_same(compose_cfg, kernel):
    """hardware.optimizer_kernel changes how Adam updates, not what: the loss curve of 30 steps stays within noise of
    torch's default update (weights themselves are no test: conv biases ahead of a BatchNorm get pure-noise
    gradients, which Adam scales up to full steps whatever the kernel), for the VAE's optimiser and the GAN's two."""
    import lightning as L
    from hydra.utils import instantiate

    class Losses(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            value = outputs["loss"] if "loss" in outputs else outputs["d_acc"]
            self.values.append(float(value))

    def train(kernel_name: str, model_name: str):
        extra = (["model.generator.base_channels=8", "model.discriminator.base_channels=8"] if model_name == "dcgan"
                 else [])
        cfg = compose_cfg("train", [f"model={model_name}", "data.image_size=8", f"hardware.optimizer_kernel={kernel_name}",
                                    *extra])
        L.seed_everything(0, verbose=False)
        model = instantiate(cfg.hardware).apply(instantiate(cfg.model))
        losses = Losses()
        trainer = L.Trainer(accelerator="cpu", max_steps=30 * (2 if model_name == "dcgan" else 1), logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[losses])
        trainer.fit(model, datamodule=instantiate(cfg.data))
        return torch.tensor(losses.values), trainer.optimizers

    for model_name in ("vae", "dcgan"):
        reference, _ = train("auto", model_name)
        curve, optimizers = train(kernel, model_name)
        for optimizer in optimizers:
            group = optimizer.param_groups[0]
            if kernel == "fused":
                assert group["fused"] is True
            else:
                assert group["foreach"] is (kernel == "foreach")
        # the curves fall together: same start, and within a few percent all along (noise, not another optimiser)
        assert curve[0] == pytest.approx(float(reference[0]), rel=1e-5)
        assert torch.allclose(curve, reference, rtol=0.05, atol=0.05), (model_name, curve, reference)


def test_write_json_is_strict_and_notes_non_finite_values(tmp_path):
    import json

    from gencli.io import NON_FINITE_NOTE, write_json

    path = write_json(tmp_path / "m.json", {"metrics": {"gap": float("inf"), "ok": 2.0, "t": torch.tensor(float("nan")),
                                                        "list": [np.float32("-inf"), 1]}})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert data["metrics"] == {"gap": None, "ok": 2.0, "t": None, "list": [None, 1]}
    assert data["non_finite"] == {"values": {"metrics.gap": "inf", "metrics.t": "nan", "metrics.list[0]": "-inf"},
                                  "note": NON_FINITE_NOTE}
    assert "non_finite" not in json.loads(write_json(tmp_path / "f.json", {"a": 1.5}).read_text())
