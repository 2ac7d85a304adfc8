"""DCGAN-style generator and discriminator (Radford et al. 2016) for any power-of-two size 8..64.

Generator: z (N, latent_dim) -> a 4x4 map by a 4x4 transposed convolution, then one stride-2
transposed convolution per doubling up to ``image_size``; the last one outputs the image channels
through tanh, so images are in [-1, 1]. Channels halve at each doubling, from
``base_channels * 2**(stages-1)`` (capped at ``max_channels``) at 4x4 down to ``base_channels``.

Discriminator: the mirror image. One stride-2 convolution per halving down to 4x4 (LeakyReLU 0.2,
no normalisation on the first layer as in the paper), then a 4x4 valid convolution to one raw
score per image (a logit for the BCE loss, a critic value for WGAN-GP, a margin for hinge).

Options the GAN configs use:
- ``norm``: batch (DCGAN), layer (WGAN-GP: the gradient penalty is per sample, which batch
  statistics would mix; layer norm is GroupNorm with one group over C, H, W) or none;
- ``spectral_norm`` on the discriminator (Miyato et al. 2018, the SNGAN recipe), applied with
  ``torch.nn.utils.parametrizations.spectral_norm`` so the weights stay plain tensors in the
  state_dict and checkpoints load with ``weights_only=True``;
- ``init_std``: the DCGAN paper's N(0, init_std) initialisation of conv weights (BN scales
  N(1, init_std), biases 0); null keeps PyTorch's default initialisation.

The two layers whose maps are 1x1 (the generator's first transposed convolution, from the latent seen as a
(N, latent_dim, 1, 1) map, and the discriminator's last convolution, down to one (N, 1, 1, 1) score) run as the
matrix products they are (:func:`latent_to_map`, :func:`map_to_score`), on the same parameters (``state_dict``
unchanged). A (N, C, 1, 1) tensor is contiguous in both the NCHW and the channels-last layout, and a convolution
over one is where the memory layouts that torch.compile's Inductor predicts for ``convolution_backward`` and those
cuDNN returns can differ under ``hardware.channels_last=true`` (pytorch/pytorch#171622, "[inductor]
convolution_backward meta kernel produces incorrect stride predictions for channels_last tensors"): the DCGAN recipe
crashed at its first step on a GPU with ``AssertionError: expected size 256==256, stride 16==1 at dim=1 ... Error in
op: torch.ops.aten.convolution_backward.default``. As products, no convolution sees an ambiguous layout, and the 4x4
map leaves the generator's first layer in the layout of the next layer's weight. Checked on an H200 (torch
2.11.0+cu130, ``scripts/check_dcgan_compile.py``): with the convolutions the generator's compiled backward fails with
that assertion; with the products both nets compile and train, channels-last or not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

from gencli.errors import ConfigError
from gencli.nets.conditioning import check_num_classes
from gencli.nets.conv import check_image_size

NORMS = ("batch", "layer", "none")


def gan_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm={kind!r} is not a normalisation the DCGAN nets know; use one of {', '.join(NORMS)}.")


class ConditionalNorm(nn.Module):
    """Conditional normalisation (de Vries et al. 2017; the conditional batch norm of Miyato & Koyama 2018): the
    ``kind`` norm without its own affine, then a per-class scale and shift, gamma_y * h + beta_y (gamma starts at 1,
    beta at 0, so it starts as the plain norm)."""

    def __init__(self, kind: str, channels: int, num_classes: int):
        super().__init__()
        if kind == "batch":
            self.norm: nn.Module = nn.BatchNorm2d(channels, affine=False)
        elif kind == "layer":
            self.norm = nn.GroupNorm(1, channels, affine=False)
        elif kind == "none":
            self.norm = nn.Identity()
        else:
            gan_norm(kind, channels)  # the same error as the unconditional nets
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        return self.norm(h) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


def _channels_last(t: Tensor) -> bool:
    """Whether ``t`` (4-d) is in the channels-last layout and not also plain NCHW-contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def latent_to_map(conv: nn.ConvTranspose2d, z: Tensor) -> Tensor:
    """``conv`` (kernel k, stride 1, no padding) applied to ``z`` (N, latent_dim) seen as a 1x1 map: the (N, C, k, k)
    map z @ W[latent_dim, C*k*k] + bias, the same numbers as the convolution. Returned in the layout of ``conv``'s
    weight (channels-last when ``hardware.channels_last`` made the nets so), which the next layer's weight has too."""
    weight = conv.weight
    h = (z @ weight.reshape(weight.shape[0], -1)).view(len(z), *weight.shape[1:])
    if conv.bias is not None:
        h = h + conv.bias.view(1, -1, 1, 1).to(h.dtype)
    return h.contiguous(memory_format=torch.channels_last) if _channels_last(weight) else h


def map_to_score(conv: nn.Conv2d, h: Tensor) -> Tensor:
    """``conv`` (one output channel, a kernel the size of ``h``'s map, no padding) applied to ``h`` (N, C, k, k): one
    score per image, sum over C, y, x of h * W + bias, the same numbers as the (N, 1, 1, 1) convolution output. The
    sum runs in ``h``'s own memory order (no copy of a channels-last ``h``)."""
    weight = conv.weight
    if _channels_last(h):  # (N, k, k, C) in memory: a plain view, and the weight viewed alike
        flat, w = h.permute(0, 2, 3, 1).reshape(len(h), -1), weight.permute(0, 2, 3, 1).reshape(1, -1)
    else:
        flat, w = h.reshape(len(h), -1), weight.reshape(1, -1)
    score = (flat @ w.to(flat.dtype).t()).flatten()
    return score + conv.bias.to(score.dtype) if conv.bias is not None else score


def dcgan_channels(n_stages: int, base_channels: int, max_channels: int) -> list[int]:
    """Channels from the 4x4 map outwards: [base*2**(n-1), ..., base*2, base], each capped."""
    if base_channels < 1 or max_channels < 1:
        raise ConfigError(f"base_channels={base_channels} and max_channels={max_channels} must be positive.")
    return [min(base_channels * 2 ** (n_stages - 1 - i), max_channels) for i in range(n_stages)]


def init_weights(module: nn.Module, std: float | None) -> None:
    """The DCGAN paper's initialisation: conv weights N(0, std), norm scales N(1, std), biases 0."""
    if std is None:
        return
    if std <= 0:
        raise ConfigError(f"init_std={std} must be > 0, or null for PyTorch's default initialisation.")
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """Latent (N, latent_dim) -> image (N, out_channels, image_size, image_size) in [-1, 1]."""

    def __init__(
        self,
        latent_dim: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 64,
        max_channels: int = 512,
        norm: str = "batch",
        init_std: float | None = 0.02,
        num_classes: int | None = None,
    ):
        super().__init__()
        if latent_dim < 1 or out_channels < 1:
            raise ConfigError(f"latent_dim={latent_dim} and out_channels={out_channels} must be positive.")
        n_stages = check_image_size(image_size)
        channels = dcgan_channels(n_stages, base_channels, max_channels)
        self.latent_dim = int(latent_dim)
        #: class-conditional: every norm becomes a ConditionalNorm (per-class scale and shift)
        self.num_classes = check_num_classes(num_classes)

        def norm_of(ch: int) -> nn.Module:
            return ConditionalNorm(norm, ch, self.num_classes) if self.num_classes else gan_norm(norm, ch)

        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, channels[0], 4, stride=1, padding=0, bias=norm == "none"),
            norm_of(channels[0]),
            nn.ReLU(inplace=True),
        ]
        for prev, ch in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(prev, ch, 4, stride=2, padding=1, bias=norm == "none"),
                       norm_of(ch), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(channels[-1], out_channels, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self, init_std)
        for m in self.modules():  # the per-class scales start at 1 whatever init_std did
            if isinstance(m, ConditionalNorm):
                nn.init.ones_(m.gain.weight)
                nn.init.zeros_(m.bias.weight)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        # the first transposed convolution, from the latent as a 1x1 map, is the matrix product it is (see the
        # module's docstring: no convolution over an ambiguous (N, latent_dim, 1, 1) layout)
        # the layers are read from self.net at each call, never sliced (net[1:] builds a new nn.Sequential, ~60 us
        # a call) nor cached (a cache would keep layers replaced later, e.g. by SyncBatchNorm.convert_sync_batchnorm)
        first, *rest = self.net
        h = latent_to_map(first, z.reshape(len(z), self.latent_dim))
        if not self.num_classes:
            if y is not None:
                raise ValueError("class labels were given to an unconditional generator (num_classes=null)")
            for layer in rest:
                h = layer(h)
            return h
        if y is None:
            raise ValueError("a class-conditional generator needs the labels y")
        for layer in rest:
            h = layer(h, y) if isinstance(layer, ConditionalNorm) else layer(h)
        return h


class DCGANDiscriminator(nn.Module):
    """Image (N, in_channels, image_size, image_size) -> one raw score per image, shape (N,)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 64,
        max_channels: int = 512,
        norm: str = "layer",  # works with every GAN loss (WGAN-GP refuses batch norm)
        spectral_norm: bool = False,
        leaky_slope: float = 0.2,
        init_std: float | None = 0.02,
        num_classes: int | None = None,
    ):
        super().__init__()
        if in_channels < 1:
            raise ConfigError(f"in_channels={in_channels} must be positive.")
        n_stages = check_image_size(image_size)
        channels = dcgan_channels(n_stages, base_channels, max_channels)[::-1]  # base ... widest
        self.norm = norm
        self.spectral_norm = bool(spectral_norm)
        gan_norm(norm, 1)  # reject an unknown norm before building anything
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1, bias=i == 0 or norm == "none"),
                       gan_norm(norm if i > 0 else "none", ch), nn.LeakyReLU(leaky_slope, inplace=True)]
            prev = ch
        layers.append(nn.Conv2d(prev, 1, 4, stride=1, padding=0))
        self.net = nn.Sequential(*layers)
        #: class-conditional: the projection discriminator (Miyato & Koyama 2018), score + <embed(y), phi(x)> with
        #: phi(x) the last feature map summed over positions
        self.num_classes = check_num_classes(num_classes)
        self.embed = nn.Embedding(self.num_classes, prev) if self.num_classes else None
        init_weights(self, init_std)
        if self.spectral_norm:
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    apply_spectral_norm(m)
            if self.embed is not None:
                apply_spectral_norm(self.embed)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is None and y is not None:
            raise ValueError("class labels were given to an unconditional discriminator (num_classes=null)")
        if self.embed is not None and y is None:
            raise ValueError("a projection discriminator needs the labels y")
        *body, last = self.net  # (not self.net[:-1]: a new nn.Sequential per call; see the generator's forward)
        h = x
        for layer in body:
            h = layer(h)
        # the last convolution, down to a 1x1 map, is the product it is (see the module's docstring)
        score = map_to_score(last, h)
        if self.embed is None:
            return score
        return score + (self.embed(y) * h.sum((2, 3))).sum(1)
