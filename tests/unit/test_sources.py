"""samples=DIR|file.npz: images made anywhere, checked against the reference data's shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gencli.errors import ConfigError
from gencli.metrics.sources import FileSource, ModelSource


def images(n=5, size=16, channels=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def stream_all(source: FileSource, batch_size=2) -> tuple[np.ndarray, np.ndarray]:
    floats, u8 = zip(*source.stream(batch_size))
    import torch

    return torch.cat(floats).numpy(), np.concatenate(u8)


def test_npz_folder_and_npy_give_the_same_images(tmp_path):
    array = images(5)
    np.savez(tmp_path / "s.npz", images=array)
    np.save(tmp_path / "s.npy", array[..., 0])  # N x H x W is accepted too
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(array):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")
    outs = [stream_all(FileSource(str(p), (1, 16, 16))) for p in (tmp_path / "s.npz", tmp_path / "s.npy", folder)]
    for floats, u8 in outs:
        np.testing.assert_array_equal(u8, array)
        assert floats.shape == (5, 1, 16, 16) and floats.min() >= -1 and floats.max() <= 1
        np.testing.assert_allclose((floats + 1) * 127.5, array.transpose(0, 3, 1, 2), atol=1e-4)
    source = FileSource(str(tmp_path / "s.npz"), (1, 16, 16), n=3)
    assert source.n == 3 and source.describe()["n_available"] == 5 and len(stream_all(source)[1]) == 3


def test_a_size_mismatch_names_the_shapes_and_the_fix(tmp_path):
    np.savez(tmp_path / "s.npz", images=images(4, size=28))
    with pytest.raises(ConfigError, match=r"28x28 images but data=mnist.*32x32.*data.image_size=28"):
        FileSource(str(tmp_path / "s.npz"), (1, 32, 32), data_name="mnist")


def test_channels_are_replicated_or_refused_and_recorded(tmp_path):
    np.savez(tmp_path / "gray.npz", images=images(3))
    rgb_ref = FileSource(str(tmp_path / "gray.npz"), (3, 16, 16))
    assert stream_all(rgb_ref)[1].shape == (3, 16, 16, 3)
    assert rgb_ref.describe()["channels"] == "grayscale samples replicated to 3 channels"
    np.savez(tmp_path / "color.npz", images=images(3, channels=3))
    with pytest.raises(ConfigError, match="3-channel images but data=digits has 1 channel.*data.channels=3"):
        FileSource(str(tmp_path / "color.npz"), (1, 16, 16), data_name="digits")
    np.savez(tmp_path / "gray_as_rgb.npz", images=np.repeat(images(3), 3, axis=-1))
    source = FileSource(str(tmp_path / "gray_as_rgb.npz"), (1, 16, 16))
    np.testing.assert_array_equal(stream_all(source)[1], images(3))


@pytest.mark.parametrize("make,needle", [
    (lambda p: np.savez(p / "s.npz", pictures=images(3)), "no array named 'images'"),
    (lambda p: np.savez(p / "s.npz", images=images(3).astype(np.float32)), "float32 images"),
    (lambda p: (p / "s.npz").write_text("not an archive"), "could not be read"),
    (lambda p: np.savez(p / "s.npz", images=images(1)), "at least 2"),
])
def test_unusable_sample_files_are_config_errors(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        FileSource(str(tmp_path / "s.npz"), (1, 16, 16))


def test_missing_samples_and_empty_folders(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FileSource(str(tmp_path / "nope"), (1, 16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="folder without images"):
        FileSource(str(tmp_path / "empty"), (1, 16, 16))
    with pytest.raises(ConfigError, match="n=1"):
        ModelSource(model=None, n=1, seed=0)
