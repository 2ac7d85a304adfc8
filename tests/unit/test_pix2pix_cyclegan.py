"""pix2pix's U-Net and PatchGAN, CycleGAN's ResNet generator and image history buffer (issue 26)."""

from __future__ import annotations

import pytest
import torch

from gencli.nets.cyclegan import ImageHistoryBuffer, ResnetGenerator, resnet_blocks_for
from gencli.nets.pix2pix import ConfigError, PatchDiscriminator, UNetGenerator, field_of, receptive_field
from gencli.nets.pix2pix import unet_depth as depth_for

SMALL = {"base_channels": 8}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("upscale", [1, 2, 4, 8])
def test_unet_shapes(size, upscale):
    net = UNetGenerator(1, 3, size, upscale=upscale, **SMALL)
    assert net.depth == depth_for(size) == {32: 5, 64: 6}[size]
    out = net(torch.randn(2, 1, size // upscale, size // upscale))
    assert out.shape == (2, 3, size, size)
    assert out.abs().max() <= 1  # Tanh


def test_unet_paper_layout_at_256():
    """The appendix's encoder C64-C128-C256-C512-C512-C512-C512-C512, dropout on the first three decoder layers."""
    net = UNetGenerator(3, 3, 256)
    assert [down[-1].out_channels if isinstance(down[-1], torch.nn.Conv2d) else down[-2].out_channels
            for down in net.downs] == [64, 128, 256, 512, 512, 512, 512, 512]
    with_dropout = [i for i, up in enumerate(net.ups) if any(isinstance(m, torch.nn.Dropout) for m in up)]
    assert with_dropout == [5, 6, 7]  # the three innermost levels: the first three layers the decoder runs


def test_unet_is_fully_convolutional_and_refuses_other_sizes():
    net = UNetGenerator(1, 1, 32, upscale=4, **SMALL).eval()
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 1, 64, 64)  # trained at 8 -> 32, upscales 16 -> 64
    with pytest.raises(ConfigError, match=r"a 10x10 input cannot go through this U-Net.*multiples of 8"):
        net(torch.randn(1, 1, 10, 10))
    with pytest.raises(ConfigError, match="power of two"):
        UNetGenerator(1, 1, 48)


def test_unet_skips_carry_the_input_at_full_resolution():
    """With the bottleneck cut (innermost convolution zeroed) a net without skips would output a constant; the
    U-Net's output still follows the input, pixel by pixel: the skips carry it at full resolution."""
    torch.manual_seed(0)
    net = UNetGenerator(1, 1, 32, norm="none", dropout=0.0, **SMALL).double()
    innermost = net.downs[-1][-1]
    with torch.no_grad():
        innermost.weight.zero_()
        innermost.bias.zero_()
    x = torch.randn(1, 1, 32, 32, dtype=torch.double, requires_grad=True)
    out = net(x)
    # the bottleneck is exactly zero: nothing reaches the output through it
    h = x
    for down in net.downs:
        h = down(h)
    assert torch.count_nonzero(h) == 0
    out[0, 0, 16, 16].backward()
    grad = x.grad[0, 0]
    assert grad[16, 16] != 0 and grad[15:17, 15:17].abs().sum() > 0
    y = x.detach().clone()
    y[0, 0, 16, 16] += 1.0
    assert not torch.allclose(net(y), out.detach())


def test_unet_upscale_feeds_the_upsampled_input():
    net = UNetGenerator(1, 1, 32, upscale=4, norm="none", **SMALL).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.double, requires_grad=True)
    net(x)[0, 0, 0, 0].backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("n_layers,field", [(1, 16), (2, 34), (3, 70)])
def test_patchgan_receptive_field_by_gradient(n_layers, field):
    """Score (r, c) depends on exactly the field_of box, a field x field square (70x70 for the paper's net)."""
    assert receptive_field(n_layers) == field
    torch.manual_seed(n_layers)
    net = PatchDiscriminator(1, condition_channels=1, n_layers=n_layers, **SMALL).double().eval()  # BN: affine
    size = 2 * field + 8
    image = torch.randn(1, 1, size, size, dtype=torch.double, requires_grad=True)
    condition = torch.randn(1, 1, size, size, dtype=torch.double, requires_grad=True)
    scores = net(image, condition)
    r, c = scores.shape[-2] // 2, scores.shape[-1] // 2
    top, bottom, left, right = field_of(n_layers, r, c)
    assert (bottom - top + 1, right - left + 1) == (field, field)
    assert top >= 0 and bottom < size and left >= 0 and right < size  # inside the image: no clipping
    scores[0, 0, r, c].backward()
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top: bottom + 1, left: right + 1] = True
    for grad in (image.grad[0, 0], condition.grad[0, 0]):  # the condition is seen through the same field
        assert torch.equal(grad != 0, inside)


@pytest.mark.parametrize("size", [32, 64])
def test_patchgan_shapes(size):
    cond = PatchDiscriminator(3, condition_channels=1, upscale=4, **SMALL)
    assert cond(torch.randn(2, 3, size, size), torch.randn(2, 1, size // 4, size // 4)).shape == \
        (2, 1, size // 8 - 2, size // 8 - 2)
    plain = PatchDiscriminator(3, n_layers=2, **SMALL)
    assert plain(torch.randn(2, 3, size, size)).shape == (2, 1, size // 4 - 2, size // 4 - 2)
    with pytest.raises(ConfigError, match="conditional"):
        cond(torch.randn(2, 3, size, size))
    with pytest.raises(ConfigError, match="must match"):
        cond(torch.randn(2, 3, size, size), torch.randn(2, 1, size // 2, size // 2))


@pytest.mark.parametrize("size", [32, 64])
def test_resnet_generator_shapes_and_cycle_identity_shape(size):
    g_ab = ResnetGenerator(1, 3, size, **SMALL)
    g_ba = ResnetGenerator(3, 1, size, **SMALL)
    assert g_ab.n_blocks == resnet_blocks_for(size) == 6 and resnet_blocks_for(256) == 9
    a = torch.randn(2, 1, size, size)
    b = g_ab(a)
    assert b.shape == (2, 3, size, size)
    assert g_ba(b).shape == a.shape  # the cycle A -> B -> A
    assert g_ab(g_ba(torch.randn(2, 3, size, size))).shape == (2, 3, size, size)
    with pytest.raises(ConfigError, match="multiples of 4"):
        g_ab(torch.randn(1, 1, 30, 30))
    with pytest.raises(ConfigError, match="multiple of 4"):
        ResnetGenerator(1, 1, 30)


def frames(n: int, start: int = 0) -> torch.Tensor:
    """Image k is the constant k: where a returned image came from is readable off it."""
    return torch.arange(start, start + n, dtype=torch.float).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()


def test_history_buffer_fills_to_capacity_returning_new_images():
    buf = ImageHistoryBuffer(capacity=5, seed=0)
    out = buf.query(frames(3))
    assert torch.equal(out, frames(3)) and len(buf) == 3
    out = buf.query(frames(2, 3))
    assert torch.equal(out, frames(2, 3)) and len(buf) == 5
    for k in range(20):
        buf.query(frames(4, 5 + 4 * k))
        assert len(buf) == 5  # never beyond capacity
    assert torch.equal(ImageHistoryBuffer(capacity=0).query(frames(3)), frames(3))


def test_history_buffer_swaps_half_the_time_with_stored_images():
    buf = ImageHistoryBuffer(capacity=50, seed=1)
    buf.query(frames(50))
    new = frames(4000, 50)
    out = buf.query(new)
    old = (out != new).flatten(1).any(1)
    # a binomial(4000, 1/2): 3 standard deviations are +-95
    assert abs(int(old.sum()) - 2000) < 95
    # what comes back old was stored: an earlier image, never a later one, and the buffer still holds 50
    values = out[:, 0, 0, 0]
    assert torch.all(values[old] < new[old][:, 0, 0, 0]) and len(buf) == 50
    assert torch.equal(values[~old], new[~old][:, 0, 0, 0])


def test_history_buffer_is_deterministic_per_seed_and_resumes():
    def run(seed, batches=6):
        buf = ImageHistoryBuffer(capacity=8, seed=seed)
        torch.manual_seed(123 + seed)  # the global stream must not matter
        return [buf.query(frames(5, 5 * k)) for k in range(batches)], buf

    a, _ = run(3)
    torch.rand(10)
    b, _ = run(3)
    c, _ = run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # state_dict / load_state_dict continue the same sequence
    first, buf = run(3, batches=3)
    resumed = ImageHistoryBuffer(capacity=8, seed=99)
    resumed.load_state_dict(buf.state_dict())
    assert all(torch.equal(resumed.query(frames(5, 5 * k)), a[k]) for k in range(3, 6))
    with pytest.raises(ConfigError, match="capacity"):
        ImageHistoryBuffer(capacity=4).load_state_dict(buf.state_dict())
