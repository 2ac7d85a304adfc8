"""Image pairs for image-to-image models (issue 26): (input, target) built from any image, or read from folders.

Builders (``data.pairs=...``), each ``builder(image, index) -> (input, target)`` on one float image (C, H, W) in
[-1, 1], the target being the image itself:

- :class:`Downscale` (super-resolution): the input is the image downscaled by ``factor`` (2, 4 or 8), with
  ``method`` ``area`` (the mean of each factor x factor block) or ``bicubic`` (antialiased, PIL's and MATLAB
  ``imresize``'s a=-0.5 kernel widened by the factor; only the borders differ from MATLAB). Optional degradations,
  in the classical order ``JPEG((image * blur) downscaled + noise)``: a Gaussian ``blur`` (sigma in pixels of the
  high-resolution image), Gaussian ``noise`` (standard deviation as a fraction of the value range: 0.05 is 12.75
  levels of 255) and ``jpeg`` compression (quality 1-100). The input is then rounded to 8-bit levels, as a
  low-resolution image saved to a PNG would be (``quantize=False`` keeps the floats).
- :class:`Grayscale` (colourisation): the input is the ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (what
  PIL's ``convert("L")`` and gencli's folder reader compute), one channel or replicated to three.
- :class:`Degrade` (restoration): the input is the image blurred, noised and JPEG-compressed, at its own size.

Strengths are set, not drawn: ``blur=1.0`` blurs every image with sigma 1. A pair ``[low, high]`` instead draws
each image's strength uniformly in that range (quality: a whole number in ``[low, high]``). Every random choice
of image ``i`` (its strengths, its noise) comes from ``numpy.random.default_rng(SeedSequence([seed, i, k]))``,
``k`` = 0 for blur, 1 for noise, 2 for JPEG: image i's degradation depends on (seed, i) alone, not on the batch,
the order, the worker, or which other degradations are on.

Folders: :class:`PairedFolder` indexes ``A/`` and ``B/`` subfolders matched by relative path (extension aside:
``A/x/1.png`` pairs with ``B/x/1.jpg``) and refuses folders that do not match, naming the first unmatched file;
:class:`UnpairedFolders` indexes two folders of any sizes. Both list file names only and decode an image when it
is asked for (gencli's folder :class:`~gencli.data.folder.Decoder`), as ``data=folder`` does.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from gencli.data.folder import ConfigError, Decoder, FileTable, UnreadableImage, scan_images

FACTORS = (2, 4, 8)
METHODS = ("area", "bicubic")
#: The random streams of one image (see the module docstring); part of the pairs' reproducibility contract.
BLUR_STREAM, NOISE_STREAM, JPEG_STREAM = 0, 1, 2
#: ITU-R BT.601 luma weights (R, G, B).
LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------- operations


def check_factor(factor: int, where: str = "data.pairs.factor") -> int:
    if factor not in FACTORS or isinstance(factor, bool):
        raise ConfigError(f"{where}={factor!r} is not a downscaling factor gencli offers; use one of "
                          f"{', '.join(map(str, FACTORS))}.")
    return int(factor)


def check_divisible(height: int, width: int, factor: int, where: str = "data.pairs.factor") -> None:
    """Refuse an image whose height or width is not a multiple of ``factor``, in one paragraph."""
    if height % factor or width % factor:
        fit_h, fit_w = height // factor * factor, width // factor * factor
        raise ConfigError(
            f"a {height}x{width} image cannot be downscaled by {where}={factor}: its height and width must be "
            f"multiples of {factor}. Crop or resize the images (e.g. to {fit_h}x{fit_w}, or set data.image_size to a "
            f"multiple of {factor}), or choose another factor."
        )


def downscale_images(images: Tensor, factor: int, method: str = "area") -> Tensor:
    """(N, C, H, W) -> (N, C, H/factor, W/factor); H and W must be multiples of ``factor``.

    ``area``: each output pixel is the mean of its factor x factor block (exactly ``F.interpolate(mode="area")``).
    ``bicubic``: antialiased bicubic (``F.interpolate(mode="bicubic", antialias=True)``, PIL's kernel), clamped
    to [-1, 1] since it overshoots.
    """
    factor = check_factor(factor)
    if method not in METHODS:
        raise ConfigError(f"data.pairs.method={method!r} is not a downscaling method; use one of {', '.join(METHODS)}.")
    check_divisible(images.shape[-2], images.shape[-1], factor)
    if method == "area":
        return F.avg_pool2d(images, factor)
    size = (images.shape[-2] // factor, images.shape[-1] // factor)
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def gaussian_kernel1d(sigma: float) -> Tensor:
    """The normalised Gaussian of standard deviation ``sigma``, on ``2 * ceil(3 sigma) + 1`` taps."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """(C, H, W) or (N, C, H, W) blurred by a separable Gaussian, reflecting at the borders; sigma 0: unchanged."""
    if sigma <= 0:
        return image
    batched = image if image.ndim == 4 else image[None]
    kernel = gaussian_kernel1d(sigma).to(batched)
    radius = kernel.numel() // 2
    c = batched.shape[1]
    pad_h, pad_w = min(radius, batched.shape[-2] - 1), min(radius, batched.shape[-1] - 1)
    # reflection needs pad < size: on tiny images the kernel is cut to what reflection can provide
    kh, kw = kernel[radius - pad_h: radius + pad_h + 1], kernel[radius - pad_w: radius + pad_w + 1]
    kh, kw = kh / kh.sum(), kw / kw.sum()
    out = F.pad(batched, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    out = F.conv2d(out, kh.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    out = F.conv2d(out, kw.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return out if image.ndim == 4 else out[0]


def to_uint8(image: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> uint8 (H, W, C), rounded as gencli writes PNGs."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def from_uint8(array: np.ndarray) -> Tensor:
    """uint8 (H, W, C) -> float (C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 127.5 - 1


def quantize(image: Tensor) -> Tensor:
    """Round [-1, 1] values to the 256 levels of an 8-bit image (and clamp)."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def jpeg_bytes(image: Tensor, quality: int) -> bytes:
    """(C, H, W) in [-1, 1] as a JPEG file at ``quality`` (PIL, 4:2:0 chroma subsampling for colour)."""
    array = to_uint8(image)
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def jpeg_compress(image: Tensor, quality: int) -> Tensor:
    """(C, H, W) in [-1, 1] -> the same image JPEG-encoded at ``quality`` and decoded again."""
    with Image.open(io.BytesIO(jpeg_bytes(image, quality))) as pil:
        array = np.array(pil, dtype=np.uint8)  # a writable copy
    return from_uint8(array[..., None] if array.ndim == 2 else array).to(image.device)


def luma(image: Tensor) -> Tensor:
    """(3, H, W) or (N, 3, H, W) -> one channel of BT.601 luma, 0.299 R + 0.587 G + 0.114 B."""
    weights = torch.tensor(LUMA, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(dim=-3, keepdim=True)


def image_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Image ``index``'s generator for one kind of random choice (see the module docstring)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


# --------------------------------------------------------------------------------------------------- strengths


class Strength:
    """A set strength (one number) or a range ``[low, high]`` each image draws uniformly from; None: off."""

    def __init__(self, value, name: str, low: float, high: float | None, whole: bool = False, unit: str = ""):
        self.name, self.whole = name, whole
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        example = f"{name}=75 or {name}=[30,95]" if whole else f"{name}=1.0 or {name}=[0.5,2.0]"
        problem = (f"{name}={value!r} must be a{' whole' if whole else ''} number {bounds}{unit}, or a pair "
                   f"[low, high] that each image draws from (e.g. {example}); null turns it off.")
        if value is None:
            self.range = None
            return
        values = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") else [value]
        if isinstance(value, str) or len(values) not in (1, 2):
            raise ConfigError(problem)
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(problem) from None
        if any(isinstance(v, bool) for v in values) or any(not math.isfinite(v) for v in numbers) or \
                (whole and any(v != int(v) for v in numbers)) or \
                any(v < low or (high is not None and v > high) for v in numbers) or numbers[0] > numbers[-1]:
            raise ConfigError(problem)
        self.range = (numbers[0], numbers[-1])

    @property
    def on(self) -> bool:
        return self.range is not None

    def draw(self, rng: np.random.Generator) -> float:
        low, high = self.range
        if low == high:
            return low
        if self.whole:
            return float(rng.integers(int(low), int(high), endpoint=True))
        return float(rng.uniform(low, high))

    def describe(self):
        if self.range is None:
            return None
        return self.range[0] if self.range[0] == self.range[1] else list(self.range)


class Degradations:
    """Blur, noise and JPEG at set strengths (or per-image ranges), seeded per image."""

    def __init__(self, blur=None, noise=None, jpeg=None, seed: int = 0, where: str = "data.pairs"):
        self.blur = Strength(blur, f"{where}.blur", 0.0, None, unit=" (the Gaussian's sigma, in pixels)")
        self.noise = Strength(noise, f"{where}.noise", 0.0, 1.0, unit=" (the noise's std, as a fraction of the range)")
        self.jpeg = Strength(jpeg, f"{where}.jpeg", 1, 100, whole=True, unit=" (the JPEG quality)")
        if int(seed) != seed or seed < 0:
            raise ConfigError(f"{where}.seed={seed!r} must be a whole number >= 0; it picks every image's degradation.")
        self.seed = int(seed)

    def blur_image(self, image: Tensor, index: int) -> Tensor:
        if not self.blur.on:
            return image
        return gaussian_blur(image, self.blur.draw(image_rng(self.seed, index, BLUR_STREAM)))

    def noise_and_jpeg(self, image: Tensor, index: int) -> Tensor:
        if self.noise.on:
            rng = image_rng(self.seed, index, NOISE_STREAM)
            std = self.noise.draw(rng)
            noise = torch.from_numpy(rng.standard_normal(tuple(image.shape), dtype=np.float32)).to(image.device)
            image = (image + 2 * std * noise).clamp(-1, 1)  # [-1, 1] spans 2: a fraction std of it is 2 * std
        if self.jpeg.on:
            image = jpeg_compress(image, int(self.jpeg.draw(image_rng(self.seed, index, JPEG_STREAM))))
        return image

    def describe(self) -> dict:
        return {"blur": self.blur.describe(), "noise": self.noise.describe(), "jpeg": self.jpeg.describe(),
                "seed": self.seed}


# --------------------------------------------------------------------------------------------------- builders


class PairBuilder:
    """``builder(image, index) -> (input, target)``; ``build(images, indices)`` for a batch, image by image."""

    name = "pairs"
    #: Whether the input is smaller than the target (super-resolution).
    factor = 1

    def __call__(self, image: Tensor, index: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def input_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def build(self, images: Tensor, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        if len(indices) != len(images):
            raise ValueError(f"{len(images)} images but {len(indices)} indices")
        pairs = [self(image, int(i)) for image, i in zip(images, indices)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def describe(self) -> dict:
        return {"pairs": self.name}


class Downscale(PairBuilder):
    name = "downscale"

    def __init__(self, factor: int = 4, method: str = "bicubic", blur=None, noise=None, jpeg=None, seed: int = 0,
                 quantize: bool = True):
        self.factor = check_factor(factor)
        if method not in METHODS:
            raise ConfigError(f"data.pairs.method={method!r} is not a downscaling method; use one of "
                              f"{', '.join(METHODS)}.")
        self.method = method
        self.degradations = Degradations(blur, noise, jpeg, seed)
        self.quantize = bool(quantize)

    def input_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = image_shape
        check_divisible(h, w, self.factor)
        return c, h // self.factor, w // self.factor

    def __call__(self, image: Tensor, index: int) -> tuple[Tensor, Tensor]:
        check_divisible(image.shape[-2], image.shape[-1], self.factor)
        low = self.degradations.blur_image(image, index)
        low = downscale_images(low[None], self.factor, self.method)[0]
        low = self.degradations.noise_and_jpeg(low, index)
        return (quantize(low) if self.quantize else low), image

    def describe(self) -> dict:
        return {"pairs": self.name, "factor": self.factor, "method": self.method, "quantize": self.quantize,
                **self.degradations.describe()}


class Grayscale(PairBuilder):
    name = "grayscale"

    def __init__(self, channels: int = 1, quantize: bool = True):
        if channels not in (1, 3):
            raise ConfigError(f"data.pairs.channels={channels!r}: the grayscale input has 1 channel, or 3 (the gray "
                              "replicated); use 1 or 3.")
        self.channels = int(channels)
        self.quantize = bool(quantize)

    def input_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        c, h, w = image_shape
        self._check(c)
        return self.channels, h, w

    @staticmethod
    def _check(channels: int) -> None:
        if channels != 3:
            raise ConfigError(f"data.pairs=grayscale builds colourisation pairs from colour images, but the images "
                              f"have {channels} channel(s). Use a colour data set (e.g. data=cifar10) or "
                              "data.channels=3.")

    def __call__(self, image: Tensor, index: int) -> tuple[Tensor, Tensor]:
        self._check(image.shape[0])
        gray = luma(image)
        if self.quantize:
            gray = quantize(gray)
        return gray.expand(self.channels, -1, -1).clone(), image

    def describe(self) -> dict:
        return {"pairs": self.name, "channels": self.channels, "quantize": self.quantize}


class Degrade(PairBuilder):
    name = "degrade"

    def __init__(self, blur=None, noise=0.1, jpeg=None, seed: int = 0, quantize: bool = True):
        self.degradations = Degradations(blur, noise, jpeg, seed)
        if not (self.degradations.blur.on or self.degradations.noise.on or self.degradations.jpeg.on):
            raise ConfigError("data.pairs=degrade with no degradation would pair each image with itself: set at least "
                              "one of data.pairs.blur, data.pairs.noise, data.pairs.jpeg (e.g. data.pairs.noise=0.1).")
        self.quantize = bool(quantize)

    def input_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(image_shape)

    def __call__(self, image: Tensor, index: int) -> tuple[Tensor, Tensor]:
        degraded = self.degradations.noise_and_jpeg(self.degradations.blur_image(image, index), index)
        return (quantize(degraded) if self.quantize else degraded), image

    def describe(self) -> dict:
        return {"pairs": self.name, "quantize": self.quantize, **self.degradations.describe()}


PAIR_BUILDERS = {"downscale": Downscale, "grayscale": Grayscale, "degrade": Degrade}


def make_pairs(name: str, **options) -> PairBuilder:
    """``data.pairs=name`` with its options -> the builder."""
    if name not in PAIR_BUILDERS:
        raise ConfigError(f"data.pairs={name!r} is not a pair builder; use one of {', '.join(PAIR_BUILDERS)} (or "
                          "data=paired_folder for pairs on disk).")
    try:
        return PAIR_BUILDERS[name](**options)
    except TypeError as err:
        raise ConfigError(f"data.pairs={name} does not take these options ({err}).") from None


# --------------------------------------------------------------------------------------------------- folders


def _stem(relative: str) -> str:
    return os.path.splitext(relative)[0]


def _folder(root: Path, name: str, what: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ConfigError(f"data.root={root} has no {name}/ subfolder: {what} needs data.root=DIR holding the "
                          f"subfolders {name}/ and its partner, e.g. DIR/A/*.png and DIR/B/*.png.")
    return folder


def _unique_stems(names: list[str], side: str, root: Path) -> list[str]:
    stems = [_stem(n) for n in names]
    seen: dict[str, str] = {}
    for name, stem in zip(names, stems):
        if stem in seen:
            raise ConfigError(f"data.root={root}: {side}/{seen[stem]} and {side}/{name} differ only by their "
                              "extension, so which one is paired is ambiguous (files are paired by their path "
                              "without the extension). Remove or rename one of them.")
        seen[stem] = name
    return stems


class PairedFolder:
    """``root/A`` and ``root/B`` matched by relative path without extension; lazy: lists names, decodes on demand.

    ``pair(i)`` -> (a, b) uint8 (C, H, W) arrays at ``image_size`` (``resize``: ``center_crop`` or ``resize``), or
    raises the :class:`~gencli.data.folder.UnreadableImage` naming the file.
    """

    def __init__(self, root, image_size: int, channels_a: int = 3, channels_b: int = 3, resize: str = "center_crop",
                 a: str = "A", b: str = "B"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} is not a directory. data=paired_folder needs data.root=DIR with "
                              f"the subfolders {a}/ and {b}/ of images paired by file name.")
        self.a_name, self.b_name = a, b
        a_root, b_root = _folder(self.root, a, "data=paired_folder"), _folder(self.root, b, "data=paired_folder")
        a_files, b_files = scan_images(a_root), scan_images(b_root)
        if not a_files and not b_files:
            raise ConfigError(f"data.root={self.root}: {a}/ and {b}/ hold no image files (searched recursively for "
                              "png, jpg, bmp, gif, webp, tif, ppm, pgm).")
        a_stems, b_stems = _unique_stems(a_files, a, self.root), _unique_stems(b_files, b, self.root)
        b_by_stem = dict(zip(b_stems, b_files))
        a_set = set(a_stems)
        unmatched = [(stem.split("/"), f"{a}/{name}", b) for stem, name in zip(a_stems, a_files)
                     if stem not in b_by_stem]
        unmatched += [(stem.split("/"), f"{b}/{name}", a) for stem, name in zip(b_stems, b_files) if stem not in a_set]
        if unmatched:
            unmatched.sort()
            _, first, other = unmatched[0]
            raise ConfigError(
                f"data.root={self.root}: {first} has no partner in {other}/ ({len(unmatched)} unmatched file(s) in "
                f"all; {a}/ holds {len(a_files)} images and {b}/ {len(b_files)}). data=paired_folder pairs "
                f"{a}/PATH with {b}/PATH by the path relative to each folder, extension aside (A/x/1.png with "
                f"B/x/1.jpg). Add the missing partners or remove the unmatched files; for unpaired translation use "
                "data=unpaired_folders."
            )
        self.a_files = FileTable(a_files)
        self.b_files = FileTable([b_by_stem[stem] for stem in a_stems])
        self.decode_a = Decoder(image_size, channels_a, resize)
        self.decode_b = Decoder(image_size, channels_b, resize)

    def __len__(self) -> int:
        return len(self.a_files)

    def paths(self, i: int) -> tuple[Path, Path]:
        return self.root / self.a_name / self.a_files[i], self.root / self.b_name / self.b_files[i]

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a_path, b_path = self.paths(i)
        a, b = self.decode_a(a_path), self.decode_b(b_path)
        for result in (a, b):
            if isinstance(result, UnreadableImage):
                raise result
        return a, b


class UnpairedFolders:
    """Two folders of images of any sizes (CycleGAN's domains A and B), each listed, decoded on demand."""

    def __init__(self, root_a, root_b, image_size: int, channels_a: int = 3, channels_b: int = 3,
                 resize: str = "center_crop"):
        self.roots = (Path(root_a), Path(root_b))
        tables = []
        for key, folder in zip(("root_a", "root_b"), self.roots):
            if not folder.is_dir():
                raise ConfigError(f"data.{key}={folder} is not a directory. data=unpaired_folders needs "
                                  "data.root_a=DIR and data.root_b=DIR, one folder of images per domain.")
            files = scan_images(folder)
            if not files:
                raise ConfigError(f"data.{key}={folder} holds no image files (searched recursively).")
            tables.append(FileTable(files))
        self.files = tuple(tables)
        self.decoders = (Decoder(image_size, channels_a, resize), Decoder(image_size, channels_b, resize))

    def sizes(self) -> tuple[int, int]:
        return len(self.files[0]), len(self.files[1])

    def image(self, domain: int, i: int) -> np.ndarray:
        result = self.decoders[domain](self.roots[domain] / self.files[domain][i])
        if isinstance(result, UnreadableImage):
            raise result
        return result
