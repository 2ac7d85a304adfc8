"""Inpainting masks: which pixels ``gencli sample mode=inpaint`` and ``gencli eval metric=inpaint`` fill.

A mask is a float tensor (N, 1, H, W): 1 where the pixel is known (kept), 0 where it is to be filled.
The user-facing kinds (``mask=``):

- ``center``: the central square of half the side (a quarter of the image), the usual "centre" benchmark mask;
- ``left``: the left half;
- ``random``: one box per image, each side 25-60% of the image's, at a random place; image i's box depends only
  on (seed, i), like its sampling noise (:mod:`gencli.seeds`);
- a path to an image file (PNG, ...): white (>= 128 after conversion to grey) where to fill, as in diffusers'
  inpainting pipelines; resized to the model's size with nearest-neighbour, the same mask for every image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gencli.errors import ConfigError

KINDS = ("center", "left", "random")


def make_masks(kind: str, n: int, size: tuple[int, int], seed: int = 0, start: int = 0) -> Tensor:
    """Masks for images ``start .. start + n - 1`` (1 = known, 0 = fill), shape (n, 1, H, W)."""
    h, w = (int(s) for s in size)
    mask = torch.ones(n, 1, h, w)
    if kind == "center":
        mask[:, :, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    elif kind == "left":
        mask[:, :, :, : w // 2] = 0
    elif kind == "random":
        for row, i in enumerate(range(start, start + n)):
            g = torch.Generator().manual_seed(mask_seed(seed, i))
            bh, bw = (int(round(float(torch.empty(()).uniform_(0.25, 0.6, generator=g)) * s)) for s in (h, w))
            top = int(torch.randint(0, h - bh + 1, (), generator=g))
            left = int(torch.randint(0, w - bw + 1, (), generator=g))
            mask[row, :, top: top + bh, left: left + bw] = 0
    else:
        mask = mask_from_file(kind, (h, w)).expand(n, 1, h, w).clone()
    return mask


def mask_seed(seed: int, index: int) -> int:
    """Image i's mask seed: apart from its noise streams (gencli.seeds), fixed for (seed, i)."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 12_345) % (2**63 - 1)


def mask_from_file(path: str, size: tuple[int, int]) -> Tensor:
    """A mask image: white (>= 128 in grey) where to fill. Decoded by Pillow without running anything."""
    from PIL import Image, UnidentifiedImageError

    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"mask={path} is neither a mask kind ({', '.join(KINDS)}) nor an image file: give one of "
                          "those kinds, or the path of a PNG that is white where the image is to be filled.")
    try:
        with Image.open(file) as image:
            grey = image.convert("L").resize((size[1], size[0]), Image.Resampling.NEAREST)
            values = torch.tensor(list(grey.getdata()), dtype=torch.float32).reshape(1, 1, *size)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ConfigError(f"mask={path} cannot be read as an image ({type(err).__name__}: {err}); give a PNG that is "
                          "white where the image is to be filled and black elsewhere.") from err
    mask = (values < 128).float()
    if mask.min() == 1:
        raise ConfigError(f"mask={path} has no white pixels (>= 128) at {size[0]}x{size[1]}: nothing to fill. White "
                          "marks the region to fill.")
    if mask.max() == 0:
        raise ConfigError(f"mask={path} is white everywhere at {size[0]}x{size[1]}: nothing is known. White marks only "
                          "the region to fill; for images from nothing use mode=grid.")
    return mask


def describe(kind: str, size: tuple[int, int]) -> dict:
    mask = make_masks(kind, 1, size) if kind != "random" else None
    return {"mask": str(kind), "convention": "1 = known pixel, 0 = filled; mask files: white = fill",
            "filled_fraction": None if mask is None else round(float(1 - mask.mean()), 4),
            **({"random": "one box per image, sides 25-60% of the image's, seeded by (seed, image index)"}
               if kind == "random" else {})}
