"""The KL autoencoder's losses (issue 27): L1 + perceptual + KL, the discriminator after disc_start, and the
adaptive weight of Esser et al. against a hand computation."""

import pytest
import torch
from torch import nn

from gencli.errors import ConfigError
from gencli.nets.kl_autoencoder import DiagonalGaussian, KLAutoencoder
from gencli.nets.kl_losses import (
    ADAPTIVE_EPS,
    MAX_ADAPTIVE_WEIGHT,
    KLAutoencoderLoss,
    adaptive_weight,
    generator_adversarial_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from gencli.nets.patchgan import NLayerDiscriminator


def test_discriminator_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0])
    # hinge: relu(1 - [2, .5, -1]) = [0, .5, 2] (mean 5/6); relu(1 + [-2, 0]) = [0, 1] (mean 1/2)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 0.5)))
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v)))  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0)) / 2)
    torch.testing.assert_close(vanilla_d_loss(real, fake), expected)
    torch.testing.assert_close(generator_adversarial_loss(fake), torch.tensor(1.0))


class TinyDecoder(nn.Module):
    """z -> 1x1 conv (the "last layer") of a fixed feature map h(z): y[n,o,p] = sum_i W[o,i] h[n,i,p] + b[o]."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Conv2d(2, 3, 1)
        self.conv_out = nn.Conv2d(3, 2, 1)

    def features(self, z):
        return torch.tanh(self.hidden(z))

    def forward(self, z):
        return self.conv_out(self.features(z))


class LinearCritic(nn.Module):
    """D(y)[n, 0, p] = sum_o a_o y[n, o, p]: its gradients are known in closed form."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float32))

    def forward(self, y):
        return (self.a.view(1, -1, 1, 1) * y).sum(1, keepdim=True)


def tiny_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dec = TinyDecoder()
    moments = torch.randn(4, 4, 3, 3, generator=g)  # N=4, z 2 channels, 3x3
    x = torch.randn(4, 2, 3, 3, generator=g)
    return dec, moments, x


def test_adaptive_weight_against_a_hand_computation():
    dec, moments, x = tiny_problem()
    post = DiagonalGaussian(moments)
    z = post.mode()
    y = dec(z)
    critic = LinearCritic([0.7, -1.3])
    n, p = len(x), 9
    rec = (x - y).abs().sum() / n
    g_loss = -critic(y).mean()
    # by hand: dL_rec/dW[o,i] = sum_{n,p} sign(y - x)[n,o,p] h[n,i,p] / N; dL_G/dW[o,i] = -a_o sum_{n,p} h[n,i,p] / (N P)
    h = dec.features(z).detach()
    sign = torch.sign(y.detach() - x)
    grad_rec = torch.einsum("nop,nip->oi", sign.flatten(2), h.flatten(2)) / n
    grad_g = -critic.a.detach()[:, None] * h.sum(dim=(0, 2, 3))[None, :] / (n * p)
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4) * 0.5
    got = adaptive_weight(rec, g_loss, dec.conv_out.weight, disc_weight=0.5)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad

    # and inside the loss: from disc_start on, L = L_rec + kl_w KL + lambda L_G, lambda a constant
    loss_fn = KLAutoencoderLoss(kl_weight=1e-3, disc_start=10, disc_weight=0.5)
    loss, logs = loss_fn.generator(x, y, post, step=10, last_layer=dec.conv_out.weight, discriminator=critic)
    kl = post.kl().sum() / n
    torch.testing.assert_close(logs["d_weight"], expected)
    torch.testing.assert_close(loss, rec + 1e-3 * kl + expected * g_loss)
    (grad_w,) = torch.autograd.grad(loss, dec.conv_out.weight)
    torch.testing.assert_close(grad_w.view(2, 3), grad_rec + expected * grad_g)  # no gradient through lambda


def test_adaptive_weight_is_clamped_and_scaled():
    w = torch.randn(3, 3, requires_grad=True)
    rec = (w * 2.0).sum()  # ||grad|| = 2 * 3 = 6
    flat = (w * 0.0).sum()  # ||grad|| = 0: 6 / 1e-4 = 6e4, clamped to 1e4
    assert adaptive_weight(rec, flat, w, disc_weight=0.5).item() == pytest.approx(MAX_ADAPTIVE_WEIGHT * 0.5)
    g = (w * 3.0).sum()  # ||grad|| = 9
    assert adaptive_weight(rec, g, w).item() == pytest.approx(6.0 / (9.0 + ADAPTIVE_EPS))


def test_before_disc_start_loss_and_gradients_are_exactly_l1_plus_kl():
    torch.manual_seed(0)
    net = KLAutoencoder(1, 8, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, norm_groups=4)
    disc = NLayerDiscriminator(in_channels=1, ndf=4, n_layers=1)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    loss_fn = KLAutoencoderLoss(kl_weight=1e-2, disc_start=5)

    def run(step, use_loss_fn):
        net.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        recon, post = net(x, generator=torch.Generator().manual_seed(1))
        if use_loss_fn:
            loss, logs = loss_fn.generator(x, recon, post, step, net.last_layer, disc)
        else:  # L1 summed per image, KL summed per image, both averaged over the batch
            loss, logs = (x - recon).abs().sum() / 3 + 1e-2 * post.kl().mean(), {}
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}, logs

    d_first_conv = disc.main[0].weight.detach().clone()
    for step in (0, 4):
        loss, grads, logs = run(step, True)
        ref_loss, ref_grads, _ = run(step, False)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
        assert "g_loss" not in logs and all(p.grad is None for p in disc.parameters())
        d_loss, d_logs = loss_fn.discriminator_loss(x, x, step, disc)
        assert d_loss is None and d_logs == {}
    assert torch.equal(disc.main[0].weight, d_first_conv)

    # from disc_start on the discriminator takes part: a different loss, gradients into D too
    loss, grads, logs = run(5, True)
    assert "g_loss" in logs and logs["d_weight"] > 0 and not torch.equal(loss, ref_loss)
    assert any(p.grad is not None for p in disc.parameters())
    recon, _ = net(x)
    d_loss, d_logs = loss_fn.discriminator_loss(x, recon, 5, disc)
    expected = hinge_d_loss(disc(x), disc(recon.detach()))
    torch.testing.assert_close(d_loss, expected, rtol=1e-5, atol=1e-6)


def test_discriminator_loss_does_not_reach_the_autoencoder():
    torch.manual_seed(0)
    net = KLAutoencoder(1, 8, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, norm_groups=4)
    disc = NLayerDiscriminator(in_channels=1, ndf=4, n_layers=1)
    x = torch.rand(2, 1, 8, 8)
    recon, _ = net(x)
    loss, _ = KLAutoencoderLoss(disc_start=0, disc_loss="vanilla").discriminator_loss(x, recon, 0, disc)
    loss.backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in disc.parameters())


def test_perceptual_term_is_added_per_pixel_as_the_reference():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.5)
    calls = []

    def perceptual(a, b):
        calls.append((a, b))
        return torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)

    loss_fn = KLAutoencoderLoss(perceptual=perceptual, perceptual_weight=0.1)
    rec, logs = loss_fn.reconstruction(x, y)
    # per image: 48 pixels * (0.5 + 0.1 * p_n); mean over the two images
    torch.testing.assert_close(rec, torch.tensor((48 * (0.5 + 0.1) + 48 * (0.5 + 0.3)) / 2))
    torch.testing.assert_close(logs["perceptual"], torch.tensor(2.0))
    assert calls and calls[0][0] is x
    bare, logs = KLAutoencoderLoss().reconstruction(x, y)
    torch.testing.assert_close(bare, torch.tensor(48 * 0.5))
    assert "perceptual" not in logs
    # a perceptual callable returning (N,) works the same
    flat = KLAutoencoderLoss(perceptual=lambda a, b: torch.tensor([1.0, 3.0]), perceptual_weight=0.1)
    torch.testing.assert_close(flat.reconstruction(x, y)[0], rec)


def test_validation_without_gradients_uses_no_adaptive_weight():
    dec, moments, x = tiny_problem()
    post = DiagonalGaussian(moments)
    loss_fn = KLAutoencoderLoss(kl_weight=0.0, disc_start=0)
    with torch.no_grad():
        y = dec(post.mode())
        loss, logs = loss_fn.generator(x, y, post, step=3, last_layer=None, discriminator=LinearCritic([1.0, 1.0]))
    assert logs["d_weight"].item() == 0.0
    torch.testing.assert_close(loss, (x - y).abs().sum() / len(x))


def test_disc_factor_zero_switches_the_discriminator_off_for_good():
    loss_fn = KLAutoencoderLoss(disc_start=0, disc_factor=0.0)
    assert not loss_fn.disc_active(10**6)
    assert KLAutoencoderLoss(disc_start=3).disc_active(3) and not KLAutoencoderLoss(disc_start=3).disc_active(2)


@pytest.mark.parametrize("kwargs,says", [
    (dict(disc_loss="wgan"), "disc_loss='wgan'"),
    (dict(kl_weight=-1.0), "kl_weight=-1.0"),
    (dict(disc_weight=float("nan")), "disc_weight=nan"),
    (dict(disc_start=-1), "disc_start=-1"),
    (dict(disc_start=2.5), "disc_start=2.5"),
])
def test_bad_loss_settings_are_config_errors(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        KLAutoencoderLoss(**kwargs)


def test_active_discriminator_needs_it_and_the_last_layer():
    dec, moments, x = tiny_problem()
    post = DiagonalGaussian(moments)
    y = dec(post.mode())
    loss_fn = KLAutoencoderLoss(disc_start=0)
    with pytest.raises(ValueError, match="needs the discriminator"):
        loss_fn.generator(x, y, post, 0, dec.conv_out.weight, None)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator(x, y, post, 0, None, LinearCritic([1.0, 1.0]))


def test_one_training_step_with_both_optimisers():
    """The shape of the family's step: G's loss into G's optimiser only, then D's loss into D's."""
    torch.manual_seed(0)
    net = KLAutoencoder(1, 8, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, norm_groups=4)
    disc = NLayerDiscriminator(in_channels=1, ndf=4, n_layers=1)
    opt_g = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
    loss_fn = KLAutoencoderLoss(kl_weight=1e-6, disc_start=0, disc_weight=0.5)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    d_before = [p.detach().clone() for p in disc.parameters()]
    recon, post = net(x)
    g_loss, g_logs = loss_fn.generator(x, recon, post, 0, net.last_layer, disc)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    assert all(torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))  # D not stepped by G's loss
    opt_d.zero_grad(set_to_none=True)  # drop what G's backward left in D
    d_loss, d_logs = loss_fn.discriminator_loss(x, recon, 0, disc)
    d_loss.backward()
    opt_d.step()
    assert not all(torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))
    assert torch.isfinite(g_loss) and torch.isfinite(d_loss) and {"g_loss", "d_weight", "kl", "l1"} <= set(g_logs)
    assert {"d_loss", "logits_real", "logits_fake"} == set(d_logs)
