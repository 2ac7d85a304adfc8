"""StyleGAN2 nets (issue 28): modulated conv, demodulation, equalised lr, truncation in w, shapes, conditioning."""

import math

import pytest
import torch
import torch.nn.functional as F

from gencli.errors import ConfigError
from gencli.nets.stylegan2 import (
    EqualLinear,
    MappingNetwork,
    ModulatedConv2d,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    minibatch_stddev,
    modulated_conv2d,
    truncate,
)


def test_modulated_conv_matches_direct_per_sample_computation():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    styles = torch.rand(3, 4, generator=g) + 0.5
    for demod in (True, False):
        out = modulated_conv2d(x, weight, styles, demodulate=demod, padding=1)
        for n in range(3):
            w = weight * styles[n].view(1, 4, 1, 1)
            if demod:
                w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
            torch.testing.assert_close(out[n], F.conv2d(x[n:n + 1], w, padding=1)[0], rtol=1e-5, atol=1e-5)


def test_demodulation_normalises_output_variance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, 16, 16, generator=g)
    weight = torch.randn(32, 64, 3, 3, generator=g) * 7.0
    styles = torch.rand(8, 64, generator=g) * 3 + 0.1  # arbitrary scales, which demodulation must undo
    out = modulated_conv2d(x, weight, styles, demodulate=True, padding=0)  # valid conv: no zero-padding border
    assert abs(out.var().item() - 1.0) < 0.1
    raw = modulated_conv2d(x, weight, styles, demodulate=False, padding=0)
    assert raw.var().item() > 10  # without it the scale is far from 1


def test_equal_linear_lr_multiplier_scales_weight_and_gradient():
    torch.manual_seed(0)
    layer = EqualLinear(16, 8, lr_mul=0.01)
    x = torch.randn(4, 16)
    expected = x @ (layer.weight * 0.01 / math.sqrt(16)).t() + layer.bias * 0.01
    torch.testing.assert_close(layer(x), expected)
    # the stored parameter is N(0, 1/lr_mul^2): the effective weight is N(0, 1/fan_in)
    assert abs(layer.effective_weight().std().item() * math.sqrt(16) - 1) < 0.3
    # gradient w.r.t. the stored parameter is lr_mul/sqrt(fan_in) times that w.r.t. the effective weight
    layer(x).sum().backward()
    grad_eff = torch.ones(4, 8).t() @ x
    torch.testing.assert_close(layer.weight.grad, grad_eff * 0.01 / math.sqrt(16))
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 4.0 * 0.01))


def test_mapping_tracks_w_avg_and_truncation_in_w():
    torch.manual_seed(0)
    m = MappingNetwork(8, 16, num_layers=2, w_avg_beta=0.5)
    z = torch.randn(32, 8)
    m.train()
    w = m(z)[:, 0]
    torch.testing.assert_close(m.w_avg, w.detach().mean(0) * 0.5)  # lerp from 0 with beta 0.5
    m.eval()
    avg = m.w_avg.clone()
    w1 = m(z, num_ws=4)
    torch.testing.assert_close(m(z, num_ws=4, truncation=1.0), w1)
    t0 = m(z, num_ws=4, truncation=0.0)
    torch.testing.assert_close(t0, avg.expand_as(t0))
    torch.testing.assert_close(m.w_avg, avg)  # eval mode does not move it
    half = truncate(w1, avg, 0.5, cutoff=2)
    torch.testing.assert_close(half[:, :2], avg + 0.5 * (w1[:, :2] - avg))
    torch.testing.assert_close(half[:, 2:], w1[:, 2:])


@pytest.mark.parametrize("size", [8, 16, 32, 64, 128])
def test_generator_and_discriminator_shapes(size):
    torch.manual_seed(0)
    small = dict(channel_base=64, max_channels=16)
    G = StyleGAN2Generator(latent_dim=8, out_channels=3, image_size=size, w_dim=16, mapping_layers=2, **small)
    D = StyleGAN2Discriminator(in_channels=3, image_size=size, **small)
    assert G.num_ws == 2 * (int(math.log2(size)) - 1)
    img = G(torch.randn(4, 8))
    assert img.shape == (4, 3, size, size) and torch.isfinite(img).all()
    assert D(img).shape == (4,)


def test_conditional_generator_and_projection_discriminator():
    torch.manual_seed(0)
    G = StyleGAN2Generator(latent_dim=8, out_channels=1, image_size=8, w_dim=16, mapping_layers=2,
                           channel_base=64, max_channels=16, num_classes=3).eval()
    D = StyleGAN2Discriminator(in_channels=1, image_size=8, channel_base=64, max_channels=16, num_classes=3)
    z = torch.randn(1, 8).repeat(3, 1)
    y = torch.tensor([0, 1, 2])
    img = G(z, y, noise_mode="const")
    assert img.shape == (3, 1, 8, 8)
    assert not torch.allclose(img[0], img[1])  # the label changes the image for the same z
    x = torch.randn(1, 1, 8, 8).repeat(3, 1, 1, 1)
    s = D(x, y)
    assert s.shape == (3,) and not torch.allclose(s[0], s[1])
    with pytest.raises(ConfigError):
        G(z)
    with pytest.raises(ConfigError):
        D(x)


def test_style_mixing_and_noise_modes():
    torch.manual_seed(0)
    G = StyleGAN2Generator(latent_dim=8, out_channels=1, image_size=8, w_dim=16, mapping_layers=2,
                           channel_base=64, max_channels=16, style_mixing_prob=1.0)
    z = torch.randn(2, 8)
    G.train()
    ws = G.mapping_ws(z)
    assert not torch.allclose(ws[:, 0], ws[:, -1])  # a second latent from some layer on
    G.eval()
    ws = G.mapping_ws(z)
    torch.testing.assert_close(ws[:, 0], ws[:, -1])
    for conv in [m for m in G.modules() if isinstance(m, ModulatedConv2d)]:
        conv.noise_strength.data.fill_(0.5)
    torch.testing.assert_close(G(z, noise_mode="const"), G(z, noise_mode="const"))
    assert not torch.allclose(G(z, noise_mode="random"), G(z, noise_mode="random"))


def test_minibatch_stddev_appends_group_std():
    x = torch.randn(4, 6, 4, 4)
    y = minibatch_stddev(x, group_size=2, num_channels=1)
    assert y.shape == (4, 7, 4, 4)
    torch.testing.assert_close(y[:, :6], x)
    # groups are samples {0, 2} and {1, 3} (reshape(G, -1, ...)): the std of each pair, averaged
    std02 = ((x[0] - x[2]).square() / 4 + 1e-8).sqrt().mean()
    torch.testing.assert_close(y[0, 6, 0, 0], std02, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y[0, 6], y[2, 6])


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError):
        StyleGAN2Generator(image_size=12)
    with pytest.raises(ConfigError):
        StyleGAN2Generator(image_size=8, style_mixing_prob=2)
    with pytest.raises(ConfigError):
        EqualLinear(4, 4, lr_mul=0)


def test_one_training_step_with_r1_path_length_and_augmentation():
    """The pieces together on CPU: D step with R1 on augmented reals, G step and the path-length pass through
    mapping_ws/synthesis; every parameter of both nets gets a finite gradient."""
    from gencli.nets.augment import AugmentPipe, DiffAugment
    from gencli.nets.regularisers import PathLengthPenalty, r1_penalty

    torch.manual_seed(0)
    G = StyleGAN2Generator(latent_dim=8, out_channels=3, image_size=8, w_dim=16, mapping_layers=2,
                           channel_base=64, max_channels=16, num_classes=2)
    D = StyleGAN2Discriminator(in_channels=3, image_size=8, channel_base=64, max_channels=16, num_classes=2)
    for aug in (DiffAugment(), AugmentPipe(p=0.5)):
        G.zero_grad()
        D.zero_grad()
        reals, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
        z = torch.randn(4, 8)
        reals = reals.requires_grad_(True)
        d_real = D(aug(reals), y)
        d_fake = D(aug(G(z, y).detach()), y)
        loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean() + r1_penalty(d_real, reals, 1.0) * 16
        loss_d.backward()
        for name, p in D.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        loss_g = F.softplus(-D(aug(G(z, y)), y)).mean()
        ws = G.mapping_ws(z[:2], y[:2])
        loss_g = loss_g + PathLengthPenalty()(G.synthesis(ws), ws) * 4
        loss_g.backward()
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                continue  # starts at 0; its gradient may be any number
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
