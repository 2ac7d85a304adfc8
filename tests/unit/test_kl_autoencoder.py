"""The KL autoencoder of latent diffusion (issue 27): shapes for each f, the diagonal Gaussian, and the state-dict
mapping to diffusers' AutoencoderKL: checked against its layout transcribed from the diffusers source and a
written-out diffusers decode (these need no diffusers), and against the installed diffusers where it is present
(the test extra; skipped otherwise)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gencli.errors import ConfigError
from gencli.nets.diffusers_autoencoder_kl import (
    check_exportable,
    diffusers_config,
    diffusers_to_gencli_key,
    from_diffusers,
    gencli_to_diffusers_key,
    to_diffusers,
)
from gencli.nets.kl_autoencoder import DiagonalGaussian, KLAutoencoder

TINY = dict(ch=8, num_res_blocks=1, norm_groups=4)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("ch_mult,f", [([1, 2], 2), ([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
@pytest.mark.parametrize("z_channels", [1, 3, 4])
def test_shapes_for_each_downsampling_factor_and_z_channels(ch_mult, f, z_channels):
    torch.manual_seed(0)
    net = KLAutoencoder(in_channels=3, image_size=16, ch_mult=ch_mult, z_channels=z_channels, downsample=f, **TINY)
    assert net.downsample_factor == f
    assert net.latent_shape == (z_channels, 16 // f, 16 // f)
    x = torch.randn(2, 3, 16, 16)
    posterior = net.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, z_channels, 16 // f, 16 // f)
    assert net.decode(posterior.sample()).shape == x.shape
    # non-square inputs work too, as long as f divides both sides
    recon, post = net(torch.randn(1, 3, 16, 8))
    assert recon.shape == (1, 3, 16, 8) and post.mean.shape == (1, z_channels, 16 // f, 8 // f)


def test_grey_images_and_a_different_output_channel_count():
    net = KLAutoencoder(in_channels=1, image_size=8, ch_mult=[1, 2], z_channels=2, out_channels=2, **TINY)
    recon, posterior = net(torch.randn(3, 1, 8, 8))
    assert recon.shape == (3, 2, 8, 8) and posterior.mean.shape == (3, 2, 4, 4)


def test_mid_attention_is_optional_and_has_no_parameters_when_off():
    on = KLAutoencoder(3, 8, ch_mult=[1, 2], mid_attention=True, **TINY)
    off = KLAutoencoder(3, 8, ch_mult=[1, 2], mid_attention=False, **TINY)
    assert any(".mid.attn_1.q." in k for k in on.state_dict())
    assert not any(".mid.attn_1." in k for k in off.state_dict())
    assert off(torch.randn(1, 3, 8, 8))[0].shape == (1, 3, 8, 8)


def test_mid_attention_matches_latent_diffusions_bmm_formulation():
    # latent-diffusion's AttnBlock: w = softmax(q^T k / sqrt(c)) over keys, h = v w^T, proj_out, residual
    torch.manual_seed(0)
    net = KLAutoencoder(3, 8, ch_mult=[1, 2], **TINY)
    attn = net.encoder.mid.attn_1
    x = torch.randn(2, 16, 3, 5)
    b, c, h, w = x.shape
    y = attn.norm(x)
    q = attn.q(y).reshape(b, c, h * w).permute(0, 2, 1)
    k = attn.k(y).reshape(b, c, h * w)
    weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = attn.v(y).reshape(b, c, h * w)
    ref = x + attn.proj_out(torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, h, w))
    torch.testing.assert_close(attn(x), ref)


def test_stable_diffusions_vae_configuration_has_its_parameter_count():
    # ch 128, ch_mult [1,2,4,4], 2 blocks, z 4: the KL-f8 of Stable Diffusion, 83,653,863 parameters
    with torch.device("meta"):
        net = KLAutoencoder(3, 256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    assert sum(p.numel() for p in net.parameters()) == 83_653_863
    assert net.latent_shape == (4, 32, 32)


@pytest.mark.parametrize("kwargs,says", [
    (dict(ch_mult=[1]), "at least 2 levels"),
    (dict(ch_mult=[1, 2], downsample=4), "downsample=4"),
    (dict(ch_mult=[1, 2], norm_groups=3), "norm_groups=3"),
    (dict(ch_mult=[1, 2], num_res_blocks=0), "num_res_blocks=0"),
    (dict(ch_mult=[1, 2, 2, 2], image_size=12), "image size 12"),
])
def test_bad_configurations_name_the_value_and_the_fix(kwargs, says):
    args = dict(in_channels=3, image_size=16, ch=8, norm_groups=4) | kwargs
    with pytest.raises(ConfigError, match=says):
        KLAutoencoder(**args)


def test_encode_refuses_sides_that_f_does_not_divide():
    net = KLAutoencoder(3, 8, ch_mult=[1, 2, 2], **TINY)
    with pytest.raises(ValueError, match="multiples of f=4"):
        net.encode(torch.randn(1, 3, 8, 6))


# ----------------------------------------------------------------------------- the diagonal Gaussian
def random_moments(seed: int, shape=(3, 4, 2, 2)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    mean = torch.randn(n, c, h, w, generator=g)
    logvar = torch.randn(n, c, h, w, generator=g) * 0.5 - 0.3
    return torch.cat([mean, logvar], dim=1).double()


def test_kl_to_the_prior_matches_a_monte_carlo_estimate():
    q = DiagonalGaussian(random_moments(0))
    g = torch.Generator().manual_seed(1)
    draws = 40000
    z = torch.stack([q.sample(g) for _ in range(draws)])  # (S, N, C, H, W)
    log_q = -0.5 * (math.log(2 * math.pi) + q.logvar + (z - q.mean) ** 2 / q.var).sum(dim=(2, 3, 4))
    log_p = -0.5 * (math.log(2 * math.pi) + z**2).sum(dim=(2, 3, 4))
    terms = log_q - log_p  # (S, N)
    estimate, stderr = terms.mean(0), terms.std(0) / math.sqrt(draws)
    exact = q.kl()
    assert exact.shape == (3,)
    assert torch.all((estimate - exact).abs() < 5 * stderr), (estimate, exact, stderr)
    assert torch.all(stderr < 0.05 * exact)  # the check has power: the band is narrow next to the value


def test_kl_between_two_gaussians_matches_torch_distributions_and_is_zero_to_itself():
    p, q = DiagonalGaussian(random_moments(2)), DiagonalGaussian(random_moments(3))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(p.mean, p.std),
                                            torch.distributions.Normal(q.mean, q.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(q), ref)
    torch.testing.assert_close(p.kl(p), torch.zeros(3, dtype=torch.float64))
    prior = DiagonalGaussian(torch.zeros(3, 8, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(p.kl(prior), p.kl())


def test_nll_is_minus_the_log_density():
    q = DiagonalGaussian(random_moments(4))
    z = q.sample(torch.Generator().manual_seed(0))
    ref = -torch.distributions.Normal(q.mean, q.std).log_prob(z).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.nll(z), ref)


def test_logvar_is_clamped_as_the_reference():
    moments = torch.zeros(1, 2, 1, 1)
    moments[0, 1] = -100.0
    assert DiagonalGaussian(moments).logvar.item() == -30.0
    moments[0, 1] = 100.0
    assert DiagonalGaussian(moments).logvar.item() == 20.0


def test_sample_vs_mode():
    q = DiagonalGaussian(random_moments(5, shape=(1, 2, 2, 2)))
    torch.testing.assert_close(q.mode(), q.mean)
    draws = torch.stack([q.sample() for _ in range(20000)])
    torch.testing.assert_close(draws.mean(0), q.mean, atol=4 * q.std.max().item() / math.sqrt(20000), rtol=0)
    torch.testing.assert_close(draws.std(0), q.std, rtol=0.05, atol=0)
    # a generator makes a sample repeatable; samples differ from the mode and from each other
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, q.mode()) and not torch.equal(a, q.sample())


def test_sample_is_reparameterised():
    moments = random_moments(6, shape=(2, 1, 2, 2)).requires_grad_(True)
    q = DiagonalGaussian(moments)
    eps_g = torch.Generator().manual_seed(3)
    z = q.sample(eps_g)
    z.sum().backward()
    eps = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(3), dtype=q.mean.dtype)
    grad_mean, grad_logvar = moments.grad.chunk(2, dim=1)
    torch.testing.assert_close(grad_mean, torch.ones_like(grad_mean))
    torch.testing.assert_close(grad_logvar, 0.5 * q.std.detach() * eps)  # d/dlogvar exp(logvar/2) eps


def test_forward_decodes_a_sample_or_the_mode():
    torch.manual_seed(0)
    net = KLAutoencoder(3, 8, ch_mult=[1, 2], z_channels=2, **TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        det1, post = net(x, sample_posterior=False)
        det2, _ = net(x, sample_posterior=False)
        torch.testing.assert_close(det1, net.decode(post.mode()))
        assert torch.equal(det1, det2)
        s1, _ = net(x, generator=torch.Generator().manual_seed(0))
        s2, _ = net(x, generator=torch.Generator().manual_seed(0))
        s3, _ = net(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.allclose(s1, s3) and not torch.allclose(s1, det1)


def test_last_layer_is_the_decoders_output_conv_and_the_net_trains():
    torch.manual_seed(0)
    net = KLAutoencoder(1, 8, ch_mult=[1, 2], z_channels=2, **TINY)
    assert net.last_layer is net.decoder.conv_out.weight
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        recon, post = net(x)
        loss = (recon - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- diffusers layout
def diffusers_autoencoder_kl_layout(in_channels, out_channels, block_out_channels, layers_per_block,
                                    latent_channels, mid_block_add_attention=True) -> dict[str, tuple]:
    """Parameter names and shapes of diffusers' AutoencoderKL, transcribed from its constructors (diffusers
    src/diffusers/models/autoencoders/{autoencoder_kl,vae}.py, unets/unet_2d_blocks.py DownEncoderBlock2D,
    UpDecoderBlock2D, UNetMidBlock2D, resnet.py ResnetBlock2D, attention_processor.py Attention,
    downsampling.py Downsample2D(name="op"), upsampling.py Upsample2D(name="conv")); independent of gencli."""
    shapes: dict[str, tuple] = {}

    def conv(prefix, cin, cout, k):
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        shapes[f"{prefix}.bias"] = (cout,)

    def norm(prefix, c):
        shapes[f"{prefix}.weight"] = (c,)
        shapes[f"{prefix}.bias"] = (c,)

    def resnet(prefix, cin, cout):  # ResnetBlock2D, temb_channels=None: no time_emb_proj
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cin, cout, 3)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:  # use_in_shortcut
            conv(f"{prefix}.conv_shortcut", cin, cout, 1)

    def mid(prefix, c):  # UNetMidBlock2D, num_layers=1, heads = c // attention_head_dim = 1
        resnet(f"{prefix}.resnets.0", c, c)
        if mid_block_add_attention:
            a = f"{prefix}.attentions.0"
            norm(f"{a}.group_norm", c)
            for name in ("to_q", "to_k", "to_v", "to_out.0"):  # nn.Linear(c, c, bias=True)
                shapes[f"{a}.{name}.weight"] = (c, c)
                shapes[f"{a}.{name}.bias"] = (c,)
        resnet(f"{prefix}.resnets.1", c, c)

    boc = list(block_out_channels)
    # Encoder(out_channels=latent_channels, double_z=True)
    conv("encoder.conv_in", in_channels, boc[0], 3)
    output_channel = boc[0]
    for i in range(len(boc)):
        input_channel, output_channel = output_channel, boc[i]
        for j in range(layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", input_channel if j == 0 else output_channel, output_channel)
        if i != len(boc) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", output_channel, output_channel, 3)
    mid("encoder.mid_block", boc[-1])
    norm("encoder.conv_norm_out", boc[-1])
    conv("encoder.conv_out", boc[-1], 2 * latent_channels, 3)
    # Decoder(in_channels=latent_channels)
    conv("decoder.conv_in", latent_channels, boc[-1], 3)
    mid("decoder.mid_block", boc[-1])
    rev = boc[::-1]
    output_channel = rev[0]
    for i in range(len(rev)):
        prev_output_channel, output_channel = output_channel, rev[i]
        for j in range(layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev_output_channel if j == 0 else output_channel,
                   output_channel)
        if i != len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", output_channel, output_channel, 3)
    norm("decoder.conv_norm_out", boc[0])
    conv("decoder.conv_out", boc[0], out_channels, 3)
    conv("quant_conv", 2 * latent_channels, 2 * latent_channels, 1)
    conv("post_quant_conv", latent_channels, latent_channels, 1)
    return shapes


def layout_of(net: KLAutoencoder) -> dict[str, tuple]:
    cfg = diffusers_config(net.config, scaling_factor=1.0)
    return diffusers_autoencoder_kl_layout(cfg["in_channels"], cfg["out_channels"], cfg["block_out_channels"],
                                           cfg["layers_per_block"], cfg["latent_channels"],
                                           cfg["mid_block_add_attention"])


def test_the_transcribed_layout_is_stable_diffusions_vae():
    # spot checks of the transcription against keys and shapes of the published SD VAE (diffusion_pytorch_model)
    layout = diffusers_autoencoder_kl_layout(3, 3, [128, 256, 512, 512], 2, 4)
    assert sum(math.prod(s) for s in layout.values()) == 83_653_863
    assert layout["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert layout["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"] == (256, 512, 1, 1)
    assert layout["decoder.up_blocks.3.resnets.2.conv2.weight"] == (128, 128, 3, 3)
    assert layout["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in layout
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in layout


@pytest.mark.parametrize("mid_attention", [True, False])
def test_default_configuration_maps_one_to_one_onto_diffusers_with_matching_shapes(mid_attention):
    # the paper's KL-f8 / SD VAE defaults, built on the meta device (no memory)
    with torch.device("meta"):
        net = KLAutoencoder(3, 256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4,
                            mid_attention=mid_attention)
    sd = net.state_dict()
    mapped = to_diffusers(sd)
    assert len(mapped) == len(sd)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == layout_of(net)
    assert [p for _, p in net.named_parameters()].__len__() == len(sd)  # no buffers: every entry is a parameter


@pytest.mark.parametrize("ch_mult,blocks,z", [([1, 2], 1, 3), ([1, 2, 2], 2, 4), ([1, 1, 2, 4], 1, 1)])
def test_small_configurations_map_onto_the_layout_and_round_trip_losslessly(ch_mult, blocks, z):
    torch.manual_seed(0)
    net = KLAutoencoder(3, 16, ch=8, ch_mult=ch_mult, num_res_blocks=blocks, z_channels=z, norm_groups=4)
    sd = net.state_dict()
    mapped = to_diffusers(sd)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == layout_of(net)
    back = from_diffusers(mapped)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]), k
    # and the other way: diffusers -> gencli -> diffusers
    again = to_diffusers(back)
    assert all(torch.equal(again[k], mapped[k]) for k in mapped) and set(again) == set(mapped)
    fresh = KLAutoencoder(3, 16, ch=8, ch_mult=ch_mult, num_res_blocks=blocks, z_channels=z, norm_groups=4)
    fresh.load_state_dict(back)  # strict


def test_key_mapping_reverses_the_decoder_levels_and_renames_the_parts():
    assert gencli_to_diffusers_key("decoder.up.0.block.2.conv1.weight", 4) == "decoder.up_blocks.3.resnets.2.conv1.weight"
    assert gencli_to_diffusers_key("decoder.up.3.upsample.conv.bias", 4) == "decoder.up_blocks.0.upsamplers.0.conv.bias"
    assert gencli_to_diffusers_key("encoder.down.1.block.0.nin_shortcut.weight", 4) == \
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert gencli_to_diffusers_key("encoder.mid.attn_1.proj_out.weight", 4) == \
        "encoder.mid_block.attentions.0.to_out.0.weight"
    assert gencli_to_diffusers_key("decoder.mid.block_2.norm2.bias", 4) == "decoder.mid_block.resnets.1.norm2.bias"
    assert gencli_to_diffusers_key("decoder.norm_out.weight", 4) == "decoder.conv_norm_out.weight"
    for key in ("decoder.up.0.block.2.conv1.weight", "encoder.mid.attn_1.norm.bias", "quant_conv.weight"):
        assert diffusers_to_gencli_key(gencli_to_diffusers_key(key, 4), 4) == key


@pytest.mark.parametrize("key", ["loss.discriminator.main.0.weight", "encoder.mid.attn_1.qkv.weight",
                                 "decoder.up.0.block.0.temb_proj.weight", "model_ema.decay"])
def test_unknown_keys_are_refused_not_dropped(key):
    with pytest.raises(ValueError, match="not a key"):
        gencli_to_diffusers_key(key, 3)


def diffusers_decode(sd: dict, z: torch.Tensor, groups: int) -> torch.Tensor:
    """diffusers' AutoencoderKL.decode (vae.py Decoder.forward and the blocks'), written out on its state dict."""
    def resnet(p, h):
        x = h
        h = F.conv2d(F.silu(F.group_norm(h, groups, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)),
                     sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
        h = F.conv2d(F.silu(F.group_norm(h, groups, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)),
                     sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1)
        if f"{p}.conv_shortcut.weight" in sd:
            x = F.conv2d(x, sd[f"{p}.conv_shortcut.weight"], sd[f"{p}.conv_shortcut.bias"])
        return x + h

    def attention(p, h):  # AttnProcessor: (b, hw, c), group_norm, linear q k v, softmax(qk^T/sqrt(c)), to_out
        b, c, hh, ww = h.shape
        x = F.group_norm(h, groups, sd[f"{p}.group_norm.weight"], sd[f"{p}.group_norm.bias"], 1e-6)
        x = x.view(b, c, hh * ww).transpose(1, 2)
        q, k, v = (F.linear(x, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]) for n in ("to_q", "to_k", "to_v"))
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        out = F.linear(out, sd[f"{p}.to_out.0.weight"], sd[f"{p}.to_out.0.bias"])
        return out.transpose(1, 2).reshape(b, c, hh, ww) + h

    h = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    h = F.conv2d(h, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = resnet("decoder.mid_block.resnets.0", h)
    if "decoder.mid_block.attentions.0.to_q.weight" in sd:
        h = attention("decoder.mid_block.attentions.0", h)
    h = resnet("decoder.mid_block.resnets.1", h)
    i = 0
    while f"decoder.up_blocks.{i}.resnets.0.conv1.weight" in sd:
        j = 0
        while f"decoder.up_blocks.{i}.resnets.{j}.conv1.weight" in sd:
            h = resnet(f"decoder.up_blocks.{i}.resnets.{j}", h)
            j += 1
        if f"decoder.up_blocks.{i}.upsamplers.0.conv.weight" in sd:
            h = F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"),
                         sd[f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"],
                         sd[f"decoder.up_blocks.{i}.upsamplers.0.conv.bias"], padding=1)
        i += 1
    h = F.silu(F.group_norm(h, groups, sd["decoder.conv_norm_out.weight"], sd["decoder.conv_norm_out.bias"], 1e-6))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


def test_decode_through_the_diffusers_layout_equals_gencli_decode():
    # equal widths on two levels (ch_mult [1, 2, 2]): a wrong level order would keep every shape but not the output
    torch.manual_seed(0)
    net = KLAutoencoder(3, 16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=3, norm_groups=4).eval()
    with torch.no_grad():  # make every parameter matter (GroupNorm affine and biases are 1 and 0 at init)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ours = net.decode(z)
        theirs = diffusers_decode(to_diffusers(net.state_dict()), z, groups=4)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_config_and_refusal():
    net = KLAutoencoder(1, 16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=3, norm_groups=4,
                        mid_attention=False)
    cfg = diffusers_config(net.config, scaling_factor=0.5)
    assert cfg["block_out_channels"] == [8, 16, 16] and cfg["latent_channels"] == 3
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 3 and cfg["up_block_types"] == ["UpDecoderBlock2D"] * 3
    assert cfg["mid_block_add_attention"] is False and cfg["scaling_factor"] == 0.5 and cfg["in_channels"] == 1
    with pytest.raises(ConfigError, match=r"ch_mult=\[2, 4\].*ch_mult\[0\] = 1"):
        check_exportable(KLAutoencoder(3, 8, ch=4, ch_mult=[2, 4], norm_groups=4).config)


# ----------------------------------------------------------------------------- the installed diffusers, where present
@pytest.mark.parametrize("mid_attention", [True, False])
def test_weights_load_strictly_into_diffusers_autoencoder_kl_and_it_computes_the_same(mid_attention):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = KLAutoencoder(3, 16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=3, norm_groups=4,
                        mid_attention=mid_attention).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = diffusers_config(net.config, scaling_factor=0.5)
    assert config.pop("_class_name") == "AutoencoderKL"
    theirs = diffusers.AutoencoderKL(**config).eval()
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == layout_of(net)
    theirs.load_state_dict(to_diffusers(net.state_dict()), strict=True)
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ours, dist = net.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(dist.mean, ours.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(dist.logvar, ours.logvar, atol=1e-4, rtol=0)
        torch.testing.assert_close(theirs.decode(z).sample, net.decode(z), atol=1e-4, rtol=0)
    back = from_diffusers(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items()) and len(back) == len(net.state_dict())


def test_stable_diffusions_vae_layout_in_the_installed_diffusers():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        net = KLAutoencoder(3, 256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
        config = diffusers_config(net.config, scaling_factor=0.18215)
        config.pop("_class_name")
        theirs = diffusers.AutoencoderKL(**config)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert shapes == layout_of(net) == {k: tuple(v.shape) for k, v in to_diffusers(net.state_dict()).items()}
