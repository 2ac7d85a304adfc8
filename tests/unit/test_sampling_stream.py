"""Bounded sampling: ``gencli sample`` streams images batch by batch into samples.npz and/or images/*.png,
keeps only the grid's first ``grid_n`` images, and renames outputs into place only when complete."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_config
from gencli.errors import ConfigError
from gencli.io import NpzImageWriter, PngFolderWriter, from_uint8, png_name, save_image_grid, to_uint8
from gencli.seeds import PerImageGenerator


def random_images(n: int, shape=(5, 6, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- the writers
def test_streamed_npz_equals_savez_compressed(tmp_path):
    images = random_images(10)
    with NpzImageWriter(tmp_path / "streamed.npz", 10, images.shape[1:]) as writer:
        for chunk in np.split(images, [4, 8]):  # batches of 4, 4, 2
            writer.write(chunk)
    np.savez_compressed(tmp_path / "whole.npz", images=images)
    with np.load(tmp_path / "streamed.npz") as streamed, np.load(tmp_path / "whole.npz") as whole:
        assert streamed.files == whole.files == ["images"]
        assert streamed["images"].dtype == np.uint8
        np.testing.assert_array_equal(streamed["images"], whole["images"])
    with zipfile.ZipFile(tmp_path / "streamed.npz") as archive:
        (entry,) = archive.infolist()
        assert entry.filename == "images.npy" and entry.compress_type == zipfile.ZIP_DEFLATED
        assert entry.file_size == images.nbytes + 128  # the 128-byte .npy v1.0 header, then the pixels
    assert leftovers(tmp_path) == ["streamed.npz", "whole.npz"]  # no temp file left behind


def test_npz_writer_refuses_batches_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="uint8 batches of shape"):
        with NpzImageWriter(tmp_path / "a.npz", 4, (5, 6, 3)) as writer:
            writer.write(random_images(2).astype(np.float32))
    with pytest.raises(ValueError, match="opened for 4 images; 6"):
        with NpzImageWriter(tmp_path / "b.npz", 4, (5, 6, 3)) as writer:
            writer.write(random_images(3))
            writer.write(random_images(3))
    with pytest.raises(ValueError, match="3 of 4 images were written"):
        with NpzImageWriter(tmp_path / "c.npz", 4, (5, 6, 3)) as writer:
            writer.write(random_images(3))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["npz", "png"])
def test_a_failure_midway_leaves_the_previous_output_or_nothing(tmp_path, kind):
    target = tmp_path / ("samples.npz" if kind == "npz" else "images")
    writer_class = NpzImageWriter if kind == "npz" else PngFolderWriter

    with pytest.raises(RuntimeError, match="killed"):
        with writer_class(target, 6, (5, 6, 3)) as writer:
            writer.write(random_images(3))
            raise RuntimeError("killed")
    assert leftovers(tmp_path) == []

    with writer_class(target, 2, (5, 6, 3)) as writer:  # a complete earlier run...
        writer.write(random_images(2, seed=1))
    with pytest.raises(RuntimeError):
        with writer_class(target, 6, (5, 6, 3)) as writer:  # ...survives a failed later one untouched
            writer.write(random_images(3))
            raise RuntimeError("killed")
    assert leftovers(tmp_path) == [target.name]
    if kind == "npz":
        np.testing.assert_array_equal(np.load(target)["images"], random_images(2, seed=1))
    else:
        assert leftovers(target) == ["000000.png", "000001.png"]


def test_png_folder_writer_names_files_by_index_and_replaces_a_finished_folder(tmp_path):
    gray = random_images(3, (5, 6, 1))
    with PngFolderWriter(tmp_path / "images", 3, (5, 6, 1)) as writer:
        writer.write(gray[:2])
        writer.write(gray[2:])
    assert leftovers(tmp_path / "images") == ["000000.png", "000001.png", "000002.png"]
    for i, name in enumerate(leftovers(tmp_path / "images")):
        with Image.open(tmp_path / "images" / name) as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), gray[i, ..., 0])
    rgb = random_images(1)
    with PngFolderWriter(tmp_path / "images", 1, (5, 6, 3)) as writer:
        writer.write(rgb)
    assert leftovers(tmp_path) == ["images"] and leftovers(tmp_path / "images") == ["000000.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / "000000.png")), rgb[0])
    assert png_name(5, 10) == "000005.png" and png_name(5, 2_000_000) == "0000005.png"


# ----------------------------------------------------------------------------- the sample job
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A real gencli checkpoint of a small autoencoder on 8x8 digits (a few training steps)."""
    root = tmp_path_factory.mktemp("tiny_ae")
    cfg = compose_config("train", ["model=ae", "data=digits", "data.image_size=8", "data.batch_size=32",
                                   "model.latent_dim=6", "model.encoder.base_channels=8",
                                   "model.decoder.base_channels=8"], root / "train")
    model = instantiate(cfg.model)
    # as the train job stores it: without Hydra's own settings
    model.run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    path = root / "ae.ckpt"
    trainer.save_checkpoint(path)
    return path


def run_sample(compose_cfg, ckpt: Path, *overrides: str) -> Path:
    from gencli.jobs.sample import sample

    cfg = compose_cfg("sample", [f"ckpt={ckpt}", *overrides])
    sample(cfg)
    return Path(cfg.paths.output_dir)


def test_sample_streams_npz_and_pngs_with_a_grid_of_grid_n(compose_cfg, tiny_ckpt, tmp_path):
    from gencli.io import restore_model

    out = run_sample(compose_cfg, tiny_ckpt, "n=10", "batch_size=3", "seed=1", "format=both", "grid_n=4")
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0

    # The streamed npz is what sampling everything at once and saving it would give.
    model, _ = restore_model(tiny_ckpt)
    whole = torch.cat([model.sample(b, generator=PerImageGenerator.for_range(1, s, b)) for s, b in
                       ((0, 3), (3, 3), (6, 3), (9, 1))])
    np.testing.assert_array_equal(images, to_uint8(whole))

    # format=both: one PNG per image, named by index, with the npz's pixels.
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)]
    pngs = np.stack([np.asarray(Image.open(out / "images" / name)) for name in names])
    np.testing.assert_array_equal(pngs, images[..., 0])

    # The grid shows the first grid_n images, exactly.
    save_image_grid(tmp_path / "expected.png", from_uint8(images[:4]), scale=8)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "samples.png")),
                                  np.asarray(Image.open(tmp_path / "expected.png")))

    info = json.loads((out / "sample.json").read_text())
    assert (info["n"], info["batch_size"], info["format"], info["grid_n"]) == (10, 3, "both", 4)
    assert "per image" in info["seeding"]
    assert info["files"] == ["images/", "samples.npz", "samples.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_sample_png_only_no_grid_and_a_grid_larger_than_n(compose_cfg, tiny_ckpt):
    out = run_sample(compose_cfg, tiny_ckpt, "n=5", "batch_size=2", "format=png", "grid_n=0")
    assert sorted(p.name for p in out.iterdir()) == ["images", "sample.json"]
    assert len(list((out / "images").iterdir())) == 5

    out = run_sample(compose_cfg, tiny_ckpt, "n=3", "batch_size=2")  # format=npz, grid_n=256 > n
    assert np.load(out / "samples.npz")["images"].shape == (3, 8, 8, 1)
    grid = np.asarray(Image.open(out / "samples.png"))  # all 3 images, on a 2x2 layout of 8x8 images, x8
    assert grid.shape[:2] == (8 * (2 * 10 + 2), 8 * (2 * 10 + 2))


def test_a_failure_midway_leaves_no_samples(compose_cfg, tiny_ckpt, monkeypatch):
    from gencli.families.autoencoder import Autoencoder

    calls = []
    real_sample = Autoencoder.sample

    def fails_on_the_third_batch(self, n, generator=None, **options):
        calls.append(n)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_sample(self, n, generator=generator, **options)

    monkeypatch.setattr(Autoencoder, "sample", fails_on_the_third_batch)
    with pytest.raises(RuntimeError, match="simulated"):
        run_sample(compose_cfg, tiny_ckpt, "n=10", "batch_size=3", "format=both", "grid_n=2")
    out = Path(compose_cfg("sample", [f"ckpt={tiny_ckpt}"]).paths.output_dir)
    assert calls == [3, 3, 3]
    assert not out.exists() or list(out.iterdir()) == []  # no samples.npz, images/, grid, json or temp file


@pytest.mark.parametrize("override, message", [("format=tiff", "format=tiff is not an output format"),
                                                ("grid_n=-1", "grid_n=-1 must be an integer >= 0"),
                                                ("seed=-2", "seed=-2 must be an integer")])
def test_bad_sample_options_are_config_errors(compose_cfg, tiny_ckpt, override, message):
    with pytest.raises(ConfigError, match=message):
        run_sample(compose_cfg, tiny_ckpt, override)
