"""CycleGAN's generator and image history buffer (Zhu et al. 2017, "Unpaired Image-to-Image Translation using
Cycle-Consistent Adversarial Networks"); its discriminators are the 70x70 PatchGAN of
:class:`gencli.nets.pix2pix.PatchDiscriminator` with ``condition_channels=0``.

:class:`ResnetGenerator` -- the generator of the paper's appendix 7.2 (from Johnson et al. 2016, the reference
``ResnetGenerator``): ``c7s1-64, d128, d256, R256 x n_blocks, u128, u64, c7s1-3``, i.e. a reflection-padded 7x7
convolution, two stride-2 3x3 convolutions, ``n_blocks`` residual blocks (reflection-padded 3x3 conv, norm, ReLU,
3x3 conv, norm; identity skip), two stride-2 transposed convolutions and a 7x7 convolution to Tanh. Instance
norm, as the paper. Sized by resolution as the paper: 6 residual blocks up to 128x128 images, 9 above. Fully
convolutional: any height and width that are multiples of 4 (two halvings) work; other sizes are refused.

:class:`ImageHistoryBuffer` -- the paper's section 4 "history of generated images" (Shrivastava et al. 2017),
the reference ``ImagePool``: the discriminators are updated with generated images drawn from a buffer of the 50
latest ones. Until the buffer is full every new image is stored and returned as it is; after that, each new image
is, with probability 1/2, swapped with a stored one chosen uniformly (the stored one is returned, the new one takes
its place), and otherwise returned as it is. The coin flips and choices come from the buffer's own generator,
seeded at construction: the same seed and the same images give the same outputs, whatever else draws random
numbers; :meth:`state_dict` / :meth:`load_state_dict` keep the images and the generator's state across a resume.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gencli.nets.pix2pix import ConfigError, init_pix2pix_weights, pix2pix_norm


def resnet_blocks_for(image_size: int) -> int:
    """The paper's choice: 6 residual blocks for 128x128 training images (and smaller), 9 for 256x256 and larger."""
    return 6 if int(image_size) <= 128 else 9


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, norm: str, dropout: float, bias: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                                   pix2pix_norm(norm, channels), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), pix2pix_norm(norm, channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Image (N, in_channels, H, W) -> image (N, out_channels, H, W) in [-1, 1]; H and W multiples of 4."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 64,
        n_blocks: int | None = None,
        n_down: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_blocks = resnet_blocks_for(image_size) if n_blocks is None else int(n_blocks)
        self.n_down = int(n_down)
        if self.n_blocks < 0 or self.n_down < 0:
            raise ConfigError(f"n_blocks={n_blocks} and n_down={n_down} must be >= 0.")
        if int(image_size) % 2**self.n_down or int(image_size) < 2**self.n_down * 4:
            raise ConfigError(f"image size {image_size} is not supported by the CycleGAN generator: it halves the "
                              f"image {self.n_down} times, so the size must be a multiple of {2**self.n_down} and at "
                              f"least {2**self.n_down * 4}. Set data.image_size to e.g. 32, 64 or 128.")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, base_channels, 7, bias=bias),
                                   pix2pix_norm(norm, base_channels), nn.ReLU(True)]
        ch = base_channels
        for _ in range(self.n_down):
            layers += [nn.Conv2d(ch, ch * 2, 3, 2, 1, bias=bias), pix2pix_norm(norm, ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [ResnetBlock(ch, norm, dropout, bias) for _ in range(self.n_blocks)]
        for _ in range(self.n_down):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1, bias=bias),
                       pix2pix_norm(norm, ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_pix2pix_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        multiple = 2**self.n_down
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"the CycleGAN generator takes (N, {self.in_channels}, H, W) images; got "
                              f"{tuple(x.shape)}.")
        if x.shape[-2] % multiple or x.shape[-1] % multiple or min(x.shape[-2:]) < 4:
            raise ConfigError(f"a {x.shape[-2]}x{x.shape[-1]} image cannot go through the CycleGAN generator: its "
                              f"height and width must be multiples of {multiple} (and at least 4). Crop or pad it.")
        return self.net(x)


class ImageHistoryBuffer:
    """The reference ``ImagePool``, seeded: ``buffer.query(fakes)`` -> what the discriminator is shown.

    ``capacity=0`` turns the buffer off (every image is returned as it is)."""

    def __init__(self, capacity: int = 50, seed: int = 0, swap_probability: float = 0.5):
        if int(capacity) != capacity or capacity < 0:
            raise ConfigError(f"buffer capacity={capacity!r} must be a whole number >= 0 (the paper's 50; 0: off).")
        if not 0.0 <= float(swap_probability) <= 1.0:
            raise ConfigError(f"swap_probability={swap_probability!r} must be in [0, 1] (the paper's 0.5).")
        self.capacity = int(capacity)
        self.swap_probability = float(swap_probability)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.images: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: Tensor) -> Tensor:
        """``images`` (N, ...) -> (N, ...): each row the new image or, once full, with probability 1/2 an older one."""
        if self.capacity == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.capacity:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator).item() < self.swap_probability:
                slot = int(torch.randint(self.capacity, (), generator=self.generator))
                out.append(self.images[slot])
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "swap_probability": self.swap_probability,
                "generator": self.generator.get_state(),
                "images": torch.stack(self.images).cpu() if self.images else None}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ConfigError(f"the saved image buffer holds up to {state['capacity']} images, this one "
                              f"{self.capacity}: resume with the same buffer capacity.")
        self.swap_probability = float(state["swap_probability"])
        self.generator.set_state(state["generator"])
        images = state["images"]
        self.images = [] if images is None else [im.to(device) if device is not None else im for im in images]
