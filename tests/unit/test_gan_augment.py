"""DiffAugment, the ADA augment pipe and the ADA p update (issue 28)."""

import pytest
import torch

from gencli.errors import ConfigError
from gencli.nets.augment import AdaController, AugmentPipe, DiffAugment, shift_gather


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaugment_deterministic_per_seed(policy):
    x = torch.randn(6, 3, 8, 8)
    aug = DiffAugment(policy)
    a, b, c = aug(x, seeded(1)), aug(x, seeded(1)), aug(x, seeded(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape


@pytest.mark.parametrize("policy", ["color", "translation", "cutout"])
def test_diffaugment_differentiable_gradcheck(policy):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    aug = DiffAugment(policy)
    assert torch.autograd.gradcheck(lambda t: aug(t, seeded(3)), (x,))


def test_diffaugment_ops_do_what_they_say():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    shifted = shift_gather(x, torch.tensor([1]), torch.tensor([-1]), "zeros")
    assert shifted[0, 0, 0].tolist() == [0, 0, 0, 0]  # a row of zeros shifted in at the top
    assert shifted[0, 0, 1].tolist() == [1, 2, 3, 0]  # row 0 of x, moved left by one
    refl = shift_gather(x, torch.tensor([0]), torch.tensor([1]), "reflect")
    assert refl[0, 0, 0].tolist() == [1, 0, 1, 2]
    ones = torch.ones(50, 1, 8, 8)
    cut = DiffAugment("cutout")(ones, seeded(0))
    zeros = (cut == 0).flatten(1).sum(1)
    assert zeros.max() == 16 and zeros.min() > 0  # a 4x4 square, sometimes partly outside
    # colour keeps a constant image constant within each image
    col = DiffAugment("color")(torch.full((4, 3, 4, 4), 0.3), seeded(0))
    assert torch.allclose(col.std(dim=[1, 2, 3]), torch.zeros(4), atol=1e-6)
    with pytest.raises(ConfigError):
        DiffAugment("color,zoom")


def test_ada_pipe_p0_is_identity_and_p1_changes_every_image():
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(AugmentPipe(p=0.0)(x, seeded(0)), x)
    out = AugmentPipe(p=1.0)(x, seeded(0))
    assert out.shape == x.shape
    assert not torch.isclose(out, x).flatten(1).all(1).any()
    moved = AugmentPipe(p=0.3).to(torch.float64)  # a plain module: .to() works, p is a checkpointed buffer
    assert "p" in moved.state_dict() and float(moved.p) == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["xflip", "rotate90", "xint", "brightness", "contrast", "saturation"])
def test_ada_each_transform_deterministic_and_differentiable(name):
    only = {k: 0 for k in ["xflip", "rotate90", "xint", "brightness", "contrast", "saturation"]}
    only[name] = 1
    pipe = AugmentPipe(p=1.0, **only)
    x = torch.randn(16, 3, 8, 8)
    a, b = pipe(x, seeded(5)), pipe(x, seeded(5))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)
    xd = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pipe(t, seeded(6)), (xd,))


def test_ada_xflip_and_rotate90_are_exact_pixel_permutations():
    x = torch.randn(32, 1, 4, 4)
    out = AugmentPipe(p=1.0, rotate90=0, xint=0, brightness=0, contrast=0, saturation=0)(x, seeded(0))
    torch.testing.assert_close(out, x.flip(3))
    out = AugmentPipe(p=1.0, xflip=0, xint=0, brightness=0, contrast=0, saturation=0)(x, seeded(0))
    for i in range(32):
        assert any(torch.equal(out[i], torch.rot90(x[i], k, dims=(1, 2))) for k in range(4))


def test_ada_p_update_against_formula():
    ada = AdaController(target=0.6, interval=4, speed_images=500_000)
    batch = 64
    # overfitting D: every real scored positive, r_t = 1 > 0.6: p rises by batch*interval/500k
    for _ in range(4):
        ada.accumulate(torch.ones(batch))
    assert ada.update(batch * 4) == pytest.approx(256 / 500_000)
    assert ada.rt == pytest.approx(1.0)
    # r_t = (3 - 1)/4 = 0.5 < 0.6: p falls by the same step
    ada.accumulate(torch.tensor([1.0, 2.0, 3.0, -1.0]))
    assert ada.update(256) == pytest.approx(0.0)
    assert ada.rt == pytest.approx(0.5)
    ada.accumulate(torch.tensor([-1.0]))
    assert ada.update(10_000) == 0.0  # clipped at 0
    # from 0 to 1 in speed_images images when r_t stays above target
    steps = 0
    while ada.p < 1.0:
        ada.accumulate(torch.ones(batch))
        ada.update(batch * 4)
        steps += 1
    assert steps * batch * 4 == pytest.approx(500_000, abs=batch * 4)
    assert [s for s in range(12) if ada.due(s)] == [3, 7, 11]
    state = ada.state_dict()
    other = AdaController()
    other.load_state_dict(state)
    assert other.p == ada.p == 1.0
    with pytest.raises(ConfigError):
        AdaController(target=1.5)
