"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

It ships inside scikit-learn, so the default run needs no download. The 17-level (0..16) images are
upscaled to ``image_size`` (16 by default) with bilinear interpolation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gencli.data.base import ImageDataModule, resize_uint8


class DigitsDataModule(ImageDataModule):
    name = "digits"
    class_names = [str(d) for d in range(10)]

    def __init__(self, image_size: int = 16, channels: int = 1, **kwargs):
        super().__init__(image_size=image_size, channels=channels, **kwargs)

    def load_images(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div(16).mul(255).round().to(torch.uint8)
        images = resize_uint8(images.unsqueeze(1), self.image_size)
        return images, torch.from_numpy(digits.target).long()
