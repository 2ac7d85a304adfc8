"""The DCGAN nets' 1x1 layers as matrix products (issue 24, item 1: the dcgan_cifar10 crash under
hardware=gpu_fast, Inductor's stride assertion in a channels-last convolution_backward, pytorch/pytorch#171622).

A (N, C, 1, 1) tensor is contiguous in both layouts, and a convolution over one (the generator's first layer, the
discriminator's last) is where the layout Inductor predicts for the backward and the one cuDNN returns part ways.
Here: no convolution, forward or backward, sees a 1x1 map any more, the numbers are the convolutions', the
state_dict is unchanged, and the generator's 4x4 map leaves its first layer in its weights' layout."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gencli.nets.dcgan import ConditionalNorm, DCGANDiscriminator, DCGANGenerator

CONVS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


class ConvShapes(TorchDispatchMode):
    """Records the spatial size of every 4-d tensor argument of each convolution and convolution backward."""

    def __init__(self):
        super().__init__()
        self.maps: list[tuple[str, tuple[int, int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONVS:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() == 4:
                    self.maps.append((func.__name__, tuple(a.shape[2:])))
        return func(*args, **(kwargs or {}))


def reference_generator(g: DCGANGenerator, z, y=None):
    h = z.view(len(z), g.latent_dim, 1, 1)
    for layer in g.net:
        h = layer(h, y) if isinstance(layer, ConditionalNorm) else layer(h)
    return h


def reference_discriminator(d: DCGANDiscriminator, x, y=None):
    h = d.net[:-1](x)
    score = d.net[-1](h).flatten()
    return score if y is None else score + (d.embed(y) * h.sum((2, 3))).sum(1)


@pytest.mark.parametrize("classes", [None, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_1x1_layers_are_products_with_the_convolutions_numbers(classes, channels_last):
    torch.manual_seed(0)
    g = DCGANGenerator(16, 3, 16, base_channels=8, norm="batch", num_classes=classes, init_std=None)
    d = DCGANDiscriminator(3, 16, base_channels=8, norm="none", spectral_norm=True, num_classes=classes, init_std=None)
    keys = (list(g.state_dict()), list(d.state_dict()))
    for net in (g, d):  # a bias on the layers that have one, so it is checked too
        for m in net.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                torch.nn.init.normal_(m.bias)
    if channels_last:
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    z = torch.randn(5, 16)
    y = torch.randint(0, 3, (5,)) if classes else None
    x = torch.randn(5, 3, 16, 16, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g.train(), d.eval()  # spectral norm: no power iteration between the two calls compared
    torch.testing.assert_close(g(z, y), reference_generator(g, z, y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x, y), reference_discriminator(d, x, y), atol=1e-5, rtol=1e-5)
    # the gradients too: the products are differentiated as the convolutions were
    out, ref = d(x, y).sum(), reference_discriminator(d, x, y).sum()
    got = torch.autograd.grad(out, [x, d.net[-1].parametrizations.weight.original])
    want = torch.autograd.grad(ref, [x, d.net[-1].parametrizations.weight.original])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (list(g.state_dict()), list(d.state_dict())) == keys


def test_no_convolution_sees_a_1x1_map_and_the_layout_is_the_weights():
    torch.manual_seed(0)
    g = DCGANGenerator(100, 3, 32, base_channels=8).to(memory_format=torch.channels_last)
    d = DCGANDiscriminator(3, 32, base_channels=8, norm="batch").to(memory_format=torch.channels_last)
    z = torch.randn(4, 100)
    with ConvShapes() as seen:
        fake = g(z)
        (-d(fake).mean()).backward()  # G's step: gradients through D into G
    assert seen.maps and all(size != (1, 1) for _, size in seen.maps), seen.maps
    assert {name for name, _ in seen.maps} == {"convolution.default", "convolution_backward.default"}
    from gencli.nets.dcgan import latent_to_map

    h = latent_to_map(g.net[0], z)
    assert h.shape == (4, 32, 4, 4) and h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    assert latent_to_map(DCGANGenerator(100, 3, 32, base_channels=8).net[0], z).is_contiguous()


@pytest.mark.parametrize("classes", [None, 3])
def test_a_forward_builds_no_module_and_runs_the_nets_current_layers(monkeypatch, classes):
    """A forward builds no nn.Sequential (slicing self.net did, ~60 us a call: ~0.3 ms of an eager GAN step), keeps
    no copy of the layers (a layer replaced afterwards, as SyncBatchNorm.convert_sync_batchnorm replaces batch norms,
    is the one that runs), and the state_dict keys and deepcopy are as before."""
    import copy

    torch.manual_seed(0)
    g = DCGANGenerator(8, 3, 8, base_channels=4, num_classes=classes, norm="batch")
    d = DCGANDiscriminator(3, 8, base_channels=4, norm="batch", num_classes=classes)
    keys = (list(g.state_dict()), list(d.state_dict()))
    z, y = torch.randn(2, 8), (torch.zeros(2, dtype=torch.long) if classes else None)
    built = []
    original = torch.nn.Sequential.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Sequential, "__init__", counting)
    d(g(z, y), y)
    assert built == []
    monkeypatch.undo()
    assert (list(g.state_dict()), list(d.state_dict())) == keys
    # a layer replaced after construction runs (no stale copy), in both nets
    ran = []
    for net, i in ((g, 2), (d, 2)):
        old = net.net[i]
        net.net[i] = torch.nn.Sequential(old)
        net.net[i].register_forward_hook(lambda *a, name=type(net).__name__: ran.append(name))
    d(g(z, y), y)
    assert ran == ["DCGANGenerator", "DCGANDiscriminator"]
    twin_g, twin_d = copy.deepcopy(g), copy.deepcopy(d)
    g.eval(), d.eval(), twin_g.eval(), twin_d.eval()
    assert torch.equal(twin_d(twin_g(z, y), y), d(g(z, y), y))
