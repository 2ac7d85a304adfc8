"""The N-layer PatchGAN discriminator of taming-transformers (issue 27): output shape, receptive field, norms."""

import pytest
import torch

from gencli.errors import ConfigError
from gencli.nets.patchgan import ActNorm, NLayerDiscriminator, output_size, receptive_field


@pytest.mark.parametrize("n_layers,field", [(1, 16), (2, 34), (3, 70), (4, 142)])
def test_receptive_field_formula(n_layers, field):
    assert receptive_field(n_layers) == field  # 70x70 is pix2pix's PatchGAN


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("norm", ["batch", "actnorm"])
def test_output_shape_for_n_layers(n_layers, norm):
    torch.manual_seed(0)
    d = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=n_layers, norm=norm)
    for side in (32, 40):
        out = d(torch.randn(2, 3, side, side))
        assert out.shape == (2, 1, output_size(side, n_layers), output_size(side, n_layers))
        assert out.shape[-1] == side // 2**n_layers - 2
    assert d(torch.randn(1, 3, 32, 48)).shape == (1, 1, 32 // 2**n_layers - 2, 48 // 2**n_layers - 2)
    assert output_size(256, 3) == 30  # taming-transformers' 256x256 images: a 30x30 logit map


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_one_logit_sees_exactly_its_receptive_field(n_layers):
    torch.manual_seed(0)
    d = NLayerDiscriminator(in_channels=1, ndf=4, n_layers=n_layers).eval()  # eval: BatchNorm does not mix images
    side = 2 * receptive_field(n_layers) + 2 ** (n_layers + 1)
    x = torch.randn(1, 1, side, side, requires_grad=True)
    out = d(x)
    c = out.shape[-1] // 2
    out[0, 0, c, c].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    cols = torch.nonzero(x.grad[0, 0].abs().sum(0)).flatten()
    field = receptive_field(n_layers)
    assert rows.max() - rows.min() + 1 == field and cols.max() - cols.min() + 1 == field
    assert rows.min() > 0 and rows.max() < side - 1  # the field lay inside the image, not cut by the border


def test_layer_widths_norms_and_biases_follow_the_reference():
    d = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    convs = [m for m in d.main if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]  # no bias before BatchNorm
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.main) == 3
    # the reference's layer list by hand: convs 3*64*16+64, 64*128*16, 128*256*16, 256*512*16, 512*16+1 and
    # BatchNorm scales and shifts 2*(128+256+512)
    assert sum(p.numel() for p in d.parameters()) == 3136 + 131072 + 524288 + 2097152 + 8193 + 2 * 896 == 2_765_633
    assert "main.2.weight" in d.state_dict() and "main.11.weight" in d.state_dict()
    act = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3, norm="actnorm")
    assert sum(isinstance(m, ActNorm) for m in act.main) == 3
    assert [c.bias is not None for c in act.main if isinstance(c, torch.nn.Conv2d)] == [True] * 5
    # widths stop growing at 8 * ndf
    deep = NLayerDiscriminator(in_channels=1, ndf=2, n_layers=5)
    assert [c.out_channels for c in deep.main if isinstance(c, torch.nn.Conv2d)] == [2, 4, 8, 16, 16, 16, 1]


def test_weights_init_as_the_reference():
    torch.manual_seed(0)
    d = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    w = torch.cat([m.weight.flatten() for m in d.main if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = torch.cat([m.weight for m in d.main if isinstance(m, torch.nn.BatchNorm2d)]).detach()
    assert abs(bn.mean().item() - 1.0) < 0.01 and bn.std().item() < 0.05
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in d.main if isinstance(m, torch.nn.BatchNorm2d))


def test_actnorm_initialises_from_the_first_training_batch_only():
    torch.manual_seed(0)
    norm = ActNorm(3)
    x = torch.randn(4, 3, 5, 5) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + 1.5
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert int(norm.initialized) == 1
    loc, scale = norm.loc.detach().clone(), norm.scale.detach().clone()
    norm(torch.randn(4, 3, 5, 5) * 10)
    assert torch.equal(norm.loc, loc) and torch.equal(norm.scale, scale)
    fresh = ActNorm(3).eval()  # in eval mode an uninitialised ActNorm is the identity and stays uninitialised
    assert torch.equal(fresh(x), x) and int(fresh.initialized) == 0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="norm='group'"):
        NLayerDiscriminator(norm="group")
    with pytest.raises(ConfigError, match="n_layers=0"):
        NLayerDiscriminator(n_layers=0)
    with pytest.raises(ConfigError, match="n_layers=3 is too deep for 8x8.*n_layers=1"):
        NLayerDiscriminator(n_layers=3, image_size=8)
    NLayerDiscriminator(n_layers=3, image_size=32)
