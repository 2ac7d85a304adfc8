"""Pair builders and paired / unpaired folders for image-to-image models (issue 26)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gencli.data.pairs import (
    ConfigError,
    Degrade,
    Downscale,
    Grayscale,
    PairedFolder,
    UnpairedFolders,
    downscale_images,
    gaussian_blur,
    jpeg_bytes,
    jpeg_compress,
    make_pairs,
)


def images(n=4, c=3, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def high_frequency_energy(x: torch.Tensor) -> float:
    """Energy of the upper half of the spatial frequencies (|f| > 1/4 cycle per pixel on either axis)."""
    spectrum = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    f = torch.fft.fftfreq(x.shape[-1]).abs()
    high = (f[:, None] > 0.25) | (f[None, :] > 0.25)
    return float(spectrum[..., high].sum())


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("method", ["area", "bicubic"])
def test_downscale_shapes(factor, method):
    x = images(size=64)
    low, high = Downscale(factor, method).build(x, range(4))
    assert low.shape == (4, 3, 64 // factor, 64 // factor) and torch.equal(high, x)
    assert Downscale(factor, method).input_shape((3, 64, 64)) == (3, 64 // factor, 64 // factor)
    assert low.min() >= -1 and low.max() <= 1
    assert torch.allclose((low + 1) * 127.5, ((low + 1) * 127.5).round(), atol=1e-4)  # 8-bit levels


def test_area_downscale_is_the_block_mean():
    x = images(1, 1, 8)
    got = downscale_images(x, 4, "area")
    want = x.view(1, 1, 2, 4, 2, 4).mean(dim=(3, 5))
    assert torch.allclose(got, want)
    # bicubic of a constant is the constant; of a smooth ramp, close to the block mean
    assert torch.allclose(downscale_images(torch.full((1, 1, 16, 16), 0.3), 4, "bicubic"), torch.tensor(0.3))


def test_downscale_refuses_sizes_not_a_multiple_of_the_factor():
    with pytest.raises(ConfigError) as err:
        Downscale(8)(images(1, 3, 36)[0], 0)
    text = str(err.value)
    assert "a 36x36 image cannot be downscaled by data.pairs.factor=8" in text and "32x32" in text
    assert "\n" not in text
    with pytest.raises(ConfigError, match="multiples of 4"):
        Downscale(4).input_shape((1, 30, 32))
    with pytest.raises(ConfigError, match="factor=3 is not a downscaling factor"):
        Downscale(3)
    with pytest.raises(ConfigError, match="method='lanczos'"):
        Downscale(2, "lanczos")


def test_pairs_are_deterministic_per_seed_and_index():
    """Image i's degraded input depends on (seed, i) alone: not on the batch, its order, or its neighbours."""
    x = images(6)
    builder = Downscale(4, "bicubic", blur=[0.5, 1.5], noise=[0.01, 0.1], jpeg=[30, 90], seed=7)
    low, _ = builder.build(x, range(6))
    again, _ = Downscale(4, "bicubic", blur=[0.5, 1.5], noise=[0.01, 0.1], jpeg=[30, 90], seed=7).build(
        x[[5, 2, 0]], [5, 2, 0])
    assert torch.equal(again, low[[5, 2, 0]])
    alone, _ = builder(x[3], 3)
    assert torch.equal(alone, low[3])
    other_seed, _ = Downscale(4, "bicubic", blur=[0.5, 1.5], noise=[0.01, 0.1], jpeg=[30, 90], seed=8).build(x, range(6))
    other_index, _ = builder.build(x, range(1, 7))
    assert not torch.equal(other_seed, low) and not torch.equal(other_index, low)
    # the noise of image i is the same whether or not blur is on (separate streams)
    plain = Degrade(noise=0.05, seed=1, quantize=False)
    blurred = Degrade(blur=1.0, noise=0.05, seed=1, quantize=False)
    flat = torch.zeros(3, 16, 16)
    assert torch.equal(plain(flat, 4)[0], blurred(flat, 4)[0])  # blur of a constant is the constant


def test_blur_lowers_high_frequency_energy():
    x = images(2, 1, 32)
    energies = [high_frequency_energy(gaussian_blur(x, s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert energies[0] == high_frequency_energy(x)
    assert energies[0] > energies[1] > energies[2] > energies[3]
    assert energies[3] < 0.01 * energies[0]
    # blur preserves the mean (a normalised kernel)
    assert torch.allclose(gaussian_blur(x, 1.0).mean(), x.mean(), atol=1e-3)
    low_sharp, _ = Degrade(blur=1.5, quantize=False)(x[0], 0)
    assert high_frequency_energy(low_sharp) < 0.2 * high_frequency_energy(x[0])


def test_jpeg_quality_changes_the_bytes_and_the_error():
    x = gaussian_blur(images(1, 3, 32), 0.7)[0]  # some structure for JPEG to keep
    sizes = {q: len(jpeg_bytes(x, q)) for q in (10, 50, 95)}
    assert sizes[10] < sizes[50] < sizes[95]
    assert jpeg_bytes(x, 50)[:2] == b"\xff\xd8"  # a JPEG file
    errors = {q: float((jpeg_compress(x, q) - x).abs().mean()) for q in (10, 50, 95)}
    assert errors[10] > errors[50] > errors[95] > 0
    degraded, _ = Degrade(jpeg=10, noise=None)(x, 0)
    assert torch.equal(degraded, jpeg_compress(x, 10))
    gray = gaussian_blur(images(1, 1, 16), 0.7)[0]
    assert jpeg_compress(gray, 75).shape == (1, 16, 16)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_noise_has_the_stated_std(std):
    """noise=s is a Gaussian of std s as a fraction of the value range: 2 s in [-1, 1] units, s * 255 levels."""
    flat = torch.zeros(1, 64, 64)
    noisy, target = Degrade(noise=std, quantize=False, seed=3)(flat, 0)
    measured = float((noisy - flat).std()) / 2
    assert abs(measured - std) < 0.05 * std  # 4096 draws: the std's relative standard error is ~1.1%
    assert abs(float((noisy - flat).mean())) < 4 * 2 * std / 64
    assert torch.equal(target, flat)
    low, _ = Downscale(2, "area", noise=std, quantize=False, seed=3)(torch.zeros(1, 128, 128), 0)
    assert abs(float(low.std()) / 2 - std) < 0.05 * std


def test_grayscale_pairs():
    x = images(2, 3, 16)
    gray, target = Grayscale().build(x, [0, 1])
    want = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    assert gray.shape == (2, 1, 16, 16) and torch.equal(target, x)
    assert (gray - want).abs().max() <= 1 / 127.5  # rounded to 8-bit levels
    three, _ = Grayscale(channels=3)(x[0], 0)
    assert three.shape == (3, 16, 16) and torch.equal(three[0], three[2])
    # the same luma as PIL's convert("L") on the 8-bit image
    array = ((x[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(array).convert("L"), dtype=np.float32)
    mine, _ = Grayscale()(torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1, 0)
    assert np.abs((mine[0].numpy() + 1) * 127.5 - pil).max() <= 1
    with pytest.raises(ConfigError, match="colour images"):
        Grayscale()(images(1, 1, 16)[0], 0)


def test_bad_strengths_and_builders_are_refused():
    for kwargs, match in [({"noise": -0.1}, "noise=-0.1"), ({"jpeg": 101}, "jpeg=101"), ({"jpeg": 7.5}, "jpeg=7.5"),
                          ({"blur": [2.0, 1.0]}, r"blur=\[2.0, 1.0\]"), ({"blur": "lots"}, "blur='lots'")]:
        with pytest.raises(ConfigError, match=match):
            Downscale(4, **kwargs)
    with pytest.raises(ConfigError, match="no degradation"):
        Degrade(noise=None)
    with pytest.raises(ConfigError, match="data.pairs='sharpen' is not a pair builder"):
        make_pairs("sharpen")
    with pytest.raises(ConfigError, match="does not take"):
        make_pairs("grayscale", factor=2)
    assert make_pairs("downscale", factor=2, noise=0.01).describe() == {
        "pairs": "downscale", "factor": 2, "method": "bicubic", "quantize": True, "blur": None, "noise": 0.01,
        "jpeg": None, "seed": 0}


def write_png(path, value, size=8, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


def test_paired_folder_matches_by_relative_name(tmp_path):
    for k, name in enumerate(["x/1", "x/2", "y/3", "4"]):
        write_png(tmp_path / "A" / f"{name}.png", 10 * k, mode="L")
        write_png(tmp_path / "B" / f"{name}.{'jpg' if k == 1 else 'png'}", 10 * k + 100)
    folder = PairedFolder(tmp_path, image_size=8, channels_a=1, channels_b=3)
    assert len(folder) == 4
    for i in range(4):
        a_path, b_path = folder.paths(i)
        assert a_path.relative_to(tmp_path / "A").with_suffix("") == b_path.relative_to(tmp_path / "B").with_suffix("")
        a, b = folder.pair(i)
        assert a.shape == (1, 8, 8) and b.shape == (3, 8, 8)
        assert abs(int(b[0, 0, 0]) - int(a[0, 0, 0]) - 100) <= 3  # the partner, not another file (jpg: ~exact)


def test_paired_folder_refuses_unmatched_files_naming_the_first(tmp_path):
    for name in ["a/1", "a/2", "b/5"]:
        write_png(tmp_path / "A" / f"{name}.png", 0)
    for name in ["a/1", "a/3", "b/5", "b/6"]:
        write_png(tmp_path / "B" / f"{name}.png", 0)
    with pytest.raises(ConfigError) as err:
        PairedFolder(tmp_path, image_size=8)
    text = str(err.value)
    assert "A/a/2.png has no partner in B/" in text and "3 unmatched file(s)" in text  # a/2, a/3, b/6
    assert "data=unpaired_folders" in text and "\n" not in text
    write_png(tmp_path / "A" / "a" / "3.png", 0)
    write_png(tmp_path / "B" / "a" / "2.png", 0)
    with pytest.raises(ConfigError, match="B/b/6.png has no partner in A/"):
        PairedFolder(tmp_path, image_size=8)
    write_png(tmp_path / "A" / "b" / "6.jpg", 0)
    write_png(tmp_path / "A" / "b" / "6.png", 0)
    with pytest.raises(ConfigError, match="differ only by their extension"):
        PairedFolder(tmp_path, image_size=8)


def test_paired_folder_refuses_missing_subfolders(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        PairedFolder(tmp_path / "nope", image_size=8)
    write_png(tmp_path / "A" / "1.png", 0)
    with pytest.raises(ConfigError, match="has no B/ subfolder"):
        PairedFolder(tmp_path, image_size=8)


def test_unpaired_folders_of_any_sizes(tmp_path):
    for k in range(3):
        write_png(tmp_path / "horses" / f"{k}.png", 50, size=12)
    for k in range(5):
        write_png(tmp_path / "zebras" / f"z{k}.png", 200, size=8, mode="L")
    folders = UnpairedFolders(tmp_path / "horses", tmp_path / "zebras", image_size=8, channels_a=3, channels_b=1)
    assert folders.sizes() == (3, 5)
    assert folders.image(0, 2).shape == (3, 8, 8) and folders.image(1, 4).shape == (1, 8, 8)
    assert int(folders.image(1, 0)[0, 0, 0]) == 200
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.root_b=.*holds no image files"):
        UnpairedFolders(tmp_path / "horses", tmp_path / "empty", image_size=8)
