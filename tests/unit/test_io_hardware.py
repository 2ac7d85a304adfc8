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


# ----------------------------------------------------------------------------- leftovers of stopped runs
def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_carry_their_writer_and_only_abandoned_ones_are_cleaned(tmp_path):
    import subprocess
    import time

    from gencli import io

    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = dead_pid()
        other_host = "f" * 6 if io.HOST_TAG != "f" * 6 else "e" * 6
        made = {
            "dead_npz": tmp_path / f".samples.npz.{dead}@{io.HOST_TAG}.abcd1234.tmp",
            "dead_folder": tmp_path / f".images.{dead}@{io.HOST_TAG}.k2j3h4g5.tmp",
            "dead_trash": tmp_path / f".trash.{dead}@{io.HOST_TAG}.0a1b2c3d.images",
            "live_folder": tmp_path / f".images.{live.pid}@{io.HOST_TAG}.x9y8z7w6.tmp",
            "live_trash": tmp_path / f".trash.{live.pid}@{io.HOST_TAG}.0a1b2c3d.images",
            "own_npz": tmp_path / io.temp_name("samples.npz"),
            "other_host_fresh": tmp_path / f".samples.npz.{dead}@{other_host}.abcd1234.tmp",
            "other_host_old": tmp_path / f".metrics.json.{dead}@{other_host}.abcd1234.tmp",
            "other_host_trash": tmp_path / f".trash.{live.pid}@{other_host}.0a1b2c3d.images",
            "legacy_fresh": tmp_path / ".samples.npz.1gdtuwrf.tmp",
            "legacy_old": tmp_path / ".images.a7yjivej.tmp",
            "not_ours": tmp_path / ".cache.tmp",
            "hidden_config": tmp_path / ".hydra",
            "output": tmp_path / "samples.npz",
        }
        folders = {"dead_folder", "dead_trash", "live_folder", "live_trash", "other_host_trash", "legacy_old",
                   "hidden_config"}
        for key, path in made.items():
            if key in folders:
                path.mkdir()
                for i in range(3):
                    (path / f"{i:06d}.png").write_bytes(b"png")
                (path / "sub").mkdir()
                (path / "sub" / "x").write_bytes(b"x")
            else:
                path.write_bytes(b"data")
        day_ago = time.time() - io.UNOWNED_AFTER_S - 60
        for key in ("other_host_old", "legacy_old"):
            os.utime(made[key], (day_ago, day_ago))

        # a folder that is not gencli's own (export's out=): older gencli versions' names are left alone there
        removed = io.clean_leftovers(tmp_path, tmp_path / "missing", legacy=False)
        gone = {key for key, path in made.items() if not path.exists()}
        assert gone == {"dead_npz", "dead_folder", "dead_trash", "other_host_old", "other_host_trash"}
        assert sorted(removed) == sorted(made[key] for key in gone)
        assert io.clean_leftovers(tmp_path) == [made["legacy_old"]]  # a run folder: untouched for a day, removed
        assert io.clean_leftovers(tmp_path) == []  # nothing more: a live process's temp files are never touched
    finally:
        live.kill()
        live.wait()
    assert io.abandoned(made["live_folder"])  # once its writer is gone, it is a leftover
    assert io.leftover_owner(made["live_folder"].name) == ("temp", live.pid, io.HOST_TAG)
    assert io.leftover_owner("samples.npz") is None and io.leftover_owner(".hydra") is None


def test_writers_temp_names_are_recognised_as_theirs(tmp_path):
    from gencli import io

    npz = io.NpzImageWriter(tmp_path / "samples.npz", 2, (4, 4, 1))
    png = io.PngFolderWriter(tmp_path / "images", 2, (4, 4, 1))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [io.leftover_owner(name)[:2] for name in names] == [("temp", os.getpid())] * 2
    assert io.clean_leftovers(tmp_path) == []  # this process is alive
    npz.abort()
    png.abort()
    assert list(tmp_path.iterdir()) == []


def test_discard_renames_to_trash_at_once_and_deletes_a_large_folder_in_the_background(tmp_path):
    import time

    from gencli import io

    small = tmp_path / io.temp_name("small")
    small.mkdir()
    (small / "a.png").write_bytes(b"a")
    record = io.discard(small, tmp_path / "small", 1, 5)
    assert record.pending is None and list(tmp_path.iterdir()) == []  # quick: deleted on the spot
    assert (io.DISCARDED[-1].target.name, io.DISCARDED[-1].written, io.DISCARDED[-1].total) == ("small", 1, 5)

    big = tmp_path / io.temp_name("images")
    big.mkdir()
    for i in range(2000):
        (big / f"{i:06d}.png").write_bytes(b"png")
    started = time.monotonic()
    record = io.discard(big, tmp_path / "images", budget=0.0)  # no time in the foreground: all in the background
    assert time.monotonic() - started < 2.0
    assert not big.exists() and record.pending is not None and record.pending.name.startswith(".trash.")
    assert io.leftover_owner(record.pending.name)[:2] == ("trash", os.getpid())
    deadline = time.monotonic() + 60
    while record.pending.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []  # the background process deleted it


def test_remove_tree_never_follows_symlinks(tmp_path):
    from gencli import io

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    doomed = tmp_path / io.temp_name("images")
    doomed.mkdir()
    (doomed / "link").symlink_to(outside, target_is_directory=True)
    (doomed / "file.png").write_bytes(b"x")
    assert io.remove_tree(doomed)
    assert not doomed.exists() and (outside / "keep.txt").read_text() == "keep"


def test_remove_tree_never_enters_a_folder_swapped_for_a_link_after_it_was_listed(tmp_path, monkeypatch):
    """A walk by path names lists 'sub' as a folder, then enters whatever 'sub' is when it gets there: swapped for a
    link to a folder elsewhere in between, it deleted that folder's files. The walk by descriptors removes the link."""
    from gencli import io

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    doomed = tmp_path / io.temp_name("images")
    (doomed / "sub").mkdir(parents=True)
    (doomed / "sub" / "0.png").write_bytes(b"x")
    real_scandir = os.scandir

    class Swapping:
        def __init__(self, arg):
            self.entries = real_scandir(arg)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.entries.close()

        def __iter__(self):
            for entry in self.entries:
                if entry.name == "sub" and not (doomed / "sub").is_symlink():  # listed as a folder, then swapped
                    (doomed / "sub").rename(tmp_path / "moved")
                    (doomed / "sub").symlink_to(outside, target_is_directory=True)
                yield entry

    monkeypatch.setattr(io.os, "scandir", Swapping)
    assert io.remove_tree(doomed)
    assert not doomed.exists() and (outside / "keep.txt").read_text() == "keep"
