"""Per-image random streams: image ``i`` of ``gencli sample seed=S`` depends only on ``(S, i)``.

Whatever the batch size (``batch_size=``, a training callback's ``n``, an eval run's batches), every
image draws all of its sampling noise (its prior latent, or x_T and every DDPM / DDIM eta > 0 step)
from its own CPU ``torch.Generator``, one row of a batch at a time, and the rows are stacked: the
scheme of NVlabs/edm's ``StackedRandomGenerator``. So image ``i`` is the same in ``n=10`` and
``n=50000``, with ``batch_size=7`` or ``batch_size=256``, on CPU or GPU (up to the floating-point
differences of the network itself), and a training grid's image ``i`` is ``gencli sample`` image ``i``.

The rule (part of gencli's output format: samples made with one gencli version must be reproducible
with the next, so it does not change)::

    k0, k1 = numpy.random.SeedSequence(S).generate_state(2, dtype=numpy.uint32)
    seed(S, i) = fmix32((i + k0) mod 2**32) XOR k1
    image i's generator = torch.Generator(device="cpu").manual_seed(seed(S, i))

where ``fmix32`` is MurmurHash3's 32-bit finaliser (``h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13;
h *= 0xC2B2AE35; h ^= h >> 16``, all mod 2**32). Each ``randn(shape)`` call draws row ``i`` as
``torch.randn(shape[1:], generator=image i's generator)`` (float32), in the order the model asks.
:func:`image_seed` computes ``seed(S, i)``.

Why not ``SeedSequence([S, i])`` directly: torch's CPU generator (MT19937) uses only the low 32 bits
of a seed, so 32-bit per-image seeds drawn at random would collide within one run (two identical
images in 50,000 with probability about 25%). ``i -> seed(S, i)`` is a bijection of 32-bit integers
for every ``S`` (``fmix32`` and ``x -> x + k0``, ``x -> x XOR k1`` are invertible), so no two images of
one seed share a stream, while the SeedSequence keys make seeds well mixed across ``S``: seed 0
image 1 is not seed 1 image 0, as it would be with EDM's ``seed + i``. Seeds must be integers in
[0, 2**63); indices must be below 2**32.

A plain ``torch.Generator`` still works everywhere sampling takes a generator (one stream across the
whole batch, as before): that is for library use and tests; the jobs and callbacks use
:class:`PerImageGenerator`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from gencli.errors import ConfigError

#: What the jobs record in sample.json / metrics.json about how sampling noise was seeded.
SEED_RULE = ("per image: image i draws its noise from torch.Generator('cpu').manual_seed(gencli.seeds.image_seed("
             "seed, i)), image_seed(S, i) = fmix32((i + k0) mod 2**32) ^ k1 with (k0, k1) = "
             "numpy.random.SeedSequence(S).generate_state(2, uint32); independent of batch size")

_MASK32 = np.uint64(0xFFFFFFFF)
MAX_INDEX = 2**32


def check_seed(seed: int) -> int:
    try:
        value = int(seed)
        ok = value == seed and 0 <= value < 2**63
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"seed={seed!r} must be an integer between 0 and 2**63 - 1: it picks every image's "
                          "random stream (see gencli.seeds), e.g. seed=0.")
    return value


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser on uint32 values (computed in uint64 and masked; a bijection of 32-bit ints)."""
    h = h.astype(np.uint64) & _MASK32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _MASK32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _MASK32
    h ^= h >> np.uint64(16)
    return h


def image_seeds(seed: int, indices: Iterable[int]) -> list[int]:
    """``seed(S, i)`` for each index ``i`` (see the module docstring): the torch seed of each image's generator."""
    s = check_seed(seed)
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= MAX_INDEX):
        raise ValueError(f"image indices must be in [0, 2**32); got {int(idx.min())}..{int(idx.max())}")
    k0, k1 = (np.uint64(k) for k in np.random.SeedSequence(s).generate_state(2, dtype=np.uint32))
    mixed = _fmix32((idx.astype(np.uint64) + k0) & _MASK32) ^ k1
    return [int(v) for v in mixed]


def image_seed(seed: int, index: int) -> int:
    """The torch seed of image ``index`` under ``seed``: ``fmix32((index + k0) mod 2**32) XOR k1``."""
    return image_seeds(seed, [index])[0]


class PerImageGenerator:
    """One CPU ``torch.Generator`` per image: :meth:`randn` draws row ``r`` from image ``indices[r]``'s generator.

    Pass it wherever sampling takes ``generator=`` (``model.sample(len(g), generator=g)``, ``model.prior``,
    the diffusion samplers); it must be asked for exactly ``len(indices)`` rows at a time. Each draw advances
    every image's stream, so successive calls (a prior, then the steps of a sampler) continue each image's
    own sequence, whatever other images share its batch.
    """

    #: Noise is drawn on the CPU and moved to the model's device: the same images on any device.
    device = torch.device("cpu")

    def __init__(self, seed: int, indices: Sequence[int] | range):
        self.seed = check_seed(seed)
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in image_seeds(self.seed, self.indices)]

    @classmethod
    def for_range(cls, seed: int, start: int, count: int) -> PerImageGenerator:
        """Images ``start .. start + count - 1`` of ``seed``."""
        return cls(seed, range(int(start), int(start) + int(count)))

    def __len__(self) -> int:
        return len(self.generators)

    def __repr__(self) -> str:
        first, last = (self.indices[0], self.indices[-1]) if self.indices else (None, None)
        return f"PerImageGenerator(seed={self.seed}, images {first}..{last}, n={len(self)})"

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise of ``shape`` (on the CPU); ``shape[0]`` must be the number of images."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"{self!r} draws noise for {len(self)} images, but shape {shape} was asked for: "
                             f"sample exactly {len(self)} images with it (model.sample(len(generator), generator=...)).")
        out = torch.empty(shape, dtype=dtype)
        for row, generator in zip(out, self.generators):
            row.copy_(torch.randn(shape[1:], generator=generator, dtype=dtype))
        return out


#: What sampling accepts as ``generator=``: one stream for the batch, one per image, or torch's global RNG.
SampleGenerator = torch.Generator | PerImageGenerator | None


def randn(shape: Sequence[int], generator: SampleGenerator, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> Tensor:
    """Gaussian noise drawn on the generator's device (CPU for gencli's jobs), then moved to ``device``/``dtype``.

    ``generator`` may be a :class:`PerImageGenerator` (one stream per row), a ``torch.Generator`` (one stream
    for the whole tensor) or None (torch's global generator, on ``device``).
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, PerImageGenerator):
        noise = generator.randn(shape)
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
    return noise.to(device=device, dtype=dtype)


def batches(seed: int, n: int, batch_size: int) -> Iterator[tuple[int, PerImageGenerator]]:
    """``(start, generator for images start .. start + b - 1)`` for consecutive batches covering images 0..n-1."""
    for start in range(0, int(n), int(batch_size)):
        yield start, PerImageGenerator.for_range(seed, start, min(int(batch_size), int(n) - start))
