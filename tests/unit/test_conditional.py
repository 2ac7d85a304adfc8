"""Class-conditional generation: labels from the data, conditional nets and families, guidance, label plans, and
the metrics that judge classes (class accuracy, intra-FID)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gencli.errors import ConfigError
from gencli.families.autoencoder import Autoencoder
from gencli.families.diffusion import Diffusion
from gencli.families.gan import GAN
from gencli.families.vae import VAE
from gencli.labels import plan_labels
from gencli.nets.conv import ConvDecoder, ConvEncoder
from gencli.nets.dcgan import ConditionalNorm, DCGANDiscriminator, DCGANGenerator
from gencli.nets.mlp import MLPDenoiser
from gencli.nets.unet import UNet
from gencli.seeds import PerImageGenerator

K = 10
SHAPE = (1, 16, 16)
NAMES = [str(i) for i in range(K)]


def encoder_decoder(cls, **kw):
    torch.manual_seed(0)
    return cls(ConvEncoder(1, 16, 32, 8, 32), ConvDecoder(8, 1, 16, 8, 32), image_shape=SHAPE, latent_dim=8,
               conditional=True, num_classes=K, class_names=NAMES, **kw)


def gan(**kw):
    torch.manual_seed(0)
    model = GAN(DCGANGenerator(16, 1, 16, 16, 64, num_classes=K), DCGANDiscriminator(1, 16, 16, 64, num_classes=K),
                image_shape=SHAPE, latent_dim=16, conditional=True, num_classes=K, **kw)
    for m in model.modules():  # per-class scales and shifts as after training (they start as the plain norm)
        if isinstance(m, ConditionalNorm):
            torch.nn.init.normal_(m.gain.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias.weight, 0.0, 0.3)
    return model


def unet(num_classes=K):
    torch.manual_seed(0)
    return UNet(1, 16, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], norm_groups=4,
                num_classes=num_classes)


def diffusion(**kw):
    from gencli.diffusion.samplers import DDIMSampler

    model = Diffusion(unet(), image_shape=SHAPE, conditional=True, num_classes=K, class_names=NAMES,
                      sampler=DDIMSampler(steps=4), **kw)
    with torch.no_grad():  # a net that is not the zero function (the UNet's output layer starts at 0)
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.net_ema.load_state_dict(model.net.state_dict())
    return model.eval()


# ----------------------------------------------------------------------------- label plans
class Conditional:
    conditional, num_classes, class_names = True, 4, ["cat", "dog", "owl", "7"]


class Unconditional:
    conditional = False


def test_label_plans():
    assert plan_labels(None, Conditional).labels_for(0, 6).tolist() == [0, 1, 2, 3, 0, 1]
    assert plan_labels([2, "dog"], Conditional).labels_for(3, 3).tolist() == [1, 2, 1]
    assert plan_labels("owl", Conditional).labels_for(0, 2).tolist() == [2, 2]
    assert plan_labels(["7"], Conditional).labels_for(0, 1).tolist() == [3]  # a class *named* 7 wins over index 7
    grid = plan_labels("all", Conditional, per_row=3)
    assert grid.labels_for(0, 12).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert plan_labels(None, Unconditional) is None


@pytest.mark.parametrize("spec, words", [(9, "class 9 does not exist"), ("emu", "neither a class index"),
                                         ([], "names no class")])
def test_bad_labels_name_the_value(spec, words):
    with pytest.raises(ConfigError, match=words):
        plan_labels(spec, Conditional)


def test_unconditional_model_refuses_labels():
    with pytest.raises(ConfigError, match="unconditional") as err:
        plan_labels([3, 3, 7], Unconditional)
    assert err.value.exit_code == 2 and "labels=[3,3,7]" in err.value.message


# ----------------------------------------------------------------------------- labels from the data
def test_classes_from_the_data(image_folder, tmp_path):
    from PIL import Image

    from gencli.data import DigitsDataModule, FolderDataModule, MNISTDataModule

    assert DigitsDataModule().classes() == NAMES
    assert MNISTDataModule(root=".").classes() == NAMES
    assert FolderDataModule(root=str(image_folder)).classes() == ["cats", "dogs"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / f"{i}.png")
    assert FolderDataModule(root=str(flat)).classes() is None  # a folder without subfolders is unlabelled
    (flat / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "sub" / "x.png")
    assert FolderDataModule(root=str(flat)).classes() is None  # images loose beside class folders: unlabelled


def test_train_fills_num_classes_from_data_and_refuses_unlabelled(tmp_path, compose_cfg):
    from gencli.data import DigitsDataModule, FolderDataModule
    from gencli.jobs.train import classes_from_data

    cfg = compose_cfg("train", ["model=vae", "model.conditional=true"])
    classes_from_data(cfg, DigitsDataModule())
    assert cfg.model.num_classes == 10 and list(cfg.model.class_names) == NAMES
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "a.png")
    cfg = compose_cfg("train", ["model=vae", "model.conditional=true"])
    with pytest.raises(ConfigError, match="needs labelled data") as err:
        classes_from_data(cfg, FolderDataModule(root=str(flat)))
    assert "subfolders" in err.value.message
    cfg = compose_cfg("train", ["model=gan", "model.conditional=true", "model.num_classes=3"])
    with pytest.raises(ConfigError, match="model.num_classes=3 but data=digits has 10 classes"):
        classes_from_data(cfg, DigitsDataModule())


def test_conditional_model_needs_classes_and_nets_must_agree():
    with pytest.raises(ConfigError, match="needs at least 2 classes"):
        VAE(ConvEncoder(1, 16, 32), ConvDecoder(8, 1, 16), image_shape=SHAPE, latent_dim=8, conditional=True)
    with pytest.raises(ConfigError, match="model.net was built for 10 classes but the model is unconditional"):
        Diffusion(unet(), image_shape=SHAPE)
    with pytest.raises(ConfigError, match="model.generator was built for no classes"):
        GAN(DCGANGenerator(16, 1, 16, 16), DCGANDiscriminator(1, 16, 16, num_classes=K), image_shape=SHAPE,
            latent_dim=16, conditional=True, num_classes=K)


def test_config_composes_conditional_families(compose_cfg):
    for model in ("ae", "vae", "gan", "dcgan", "sngan", "wgan_gp", "ddpm"):
        cfg = compose_cfg("train", [f"model={model}", "model.conditional=true", "model.num_classes=10"])
        nets = [cfg.model.get(k) for k in ("net", "generator", "discriminator") if cfg.model.get(k) is not None]
        assert all(OmegaConf.select(net, "num_classes") == 10 for net in nets), model


# ----------------------------------------------------------------------------- nets
def test_class_embedding_nets():
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 50, 500])
    net = unet().eval()
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised blocks would ignore the embedding
            p.add_(0.05 * torch.randn_like(p))
        null = net(x, t)
        assert torch.allclose(null, net(x, t, torch.full((3,), K)))  # no labels = the "no class" token
        assert not torch.allclose(null, net(x, t, torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match="unconditional net"):
        unet(None)(x, t, torch.tensor([1, 2, 3]))
    mlp = MLPDenoiser(8, hidden=16, depth=1, num_classes=K)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, 8)
    assert not torch.allclose(mlp(z, t[:2], torch.tensor([0, 1])), mlp(z, t[:2], torch.tensor([2, 3])))


def test_conditional_norm_starts_as_the_plain_norm_and_projection_adds_the_inner_product():
    h = torch.randn(4, 6, 5, 5)
    cn = ConditionalNorm("batch", 6, K)
    plain = torch.nn.BatchNorm2d(6, affine=False)
    assert torch.allclose(cn(h, torch.tensor([0, 1, 2, 3])), plain(h), atol=1e-6)
    d = DCGANDiscriminator(1, 16, 16, 64, num_classes=K).eval()
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 8])
    with torch.no_grad():
        feats = d.net[:-1](x)
        expected = d.net[-1](feats).flatten() + (d.embed(y) * feats.sum((2, 3))).sum(1)
        assert torch.allclose(d(x, y), expected)
        assert not torch.allclose(d(x, y), d(x, torch.tensor([4, 9])))
    g = DCGANGenerator(16, 1, 16, 16, 64, num_classes=K).eval()
    torch.nn.init.normal_(g.net[1].gain.weight, 1.0, 0.5)
    z = torch.randn(2, 16)
    assert not torch.allclose(g(z, torch.tensor([0, 0])), g(z, torch.tensor([5, 5])))
    with pytest.raises(ValueError, match="needs the labels"):
        g(z)


# ----------------------------------------------------------------------------- families
FAMILIES = {"ae": lambda: encoder_decoder(Autoencoder), "vae": lambda: encoder_decoder(VAE), "gan": gan,
            "diffusion": diffusion}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_steer_samples_and_images_do_not_depend_on_the_batch(family):
    model = FAMILIES[family]().eval()
    if family == "ae":  # make the per-class Gaussians differ, as after training
        model.latent_mean.copy_(torch.randn(K, 8))
    labels = torch.tensor([1, 2, 3, 4])
    a = model.sample(4, PerImageGenerator.for_range(0, 0, 4), labels=labels)
    b = model.sample(4, PerImageGenerator.for_range(0, 0, 4), labels=torch.tensor([5, 6, 7, 8]))
    assert a.shape == (4, *SHAPE) and not torch.allclose(a, b)
    # image i depends on (seed, i, its label) alone
    c = torch.cat([model.sample(2, PerImageGenerator.for_range(0, s, 2), labels=labels[s:s + 2]) for s in (0, 2)])
    assert torch.allclose(a, c, atol=1e-5)
    # no labels: class-balanced by image index (i % K)
    d = model.sample(4, PerImageGenerator.for_range(0, 9, 4))
    e = model.sample(4, PerImageGenerator.for_range(0, 9, 4), labels=torch.tensor([9, 0, 1, 2]))
    assert torch.allclose(d, e, atol=1e-5)
    assert model.sampling_info()["conditional"] is True
    with pytest.raises(ConfigError, match="classes 0..9"):
        model.sample(2, labels=torch.tensor([0, 10]))


@pytest.mark.parametrize("family", ["ae", "vae"])
def test_cvae_uses_the_label_in_encoder_and_decoder(family):
    model = FAMILIES[family]().eval()
    x = torch.rand(3, *SHAPE) * 2 - 1
    y, other = torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9])
    with torch.no_grad():
        torch.nn.init.normal_(model.label_to_decoder.weight)
        assert not torch.allclose(model.encode(x, y), model.encode(x, other))
        z = model.encode(x, y)
        assert not torch.allclose(model.decode(z, y), model.decode(z, other))
        assert set(model.score_batch(x, y)) >= {"recon_mse"}
    loss = model.training_step((x, y), 0)
    loss.backward()
    assert model.label_to_decoder.weight.grad is not None


def test_conditional_autoencoder_fits_one_gaussian_per_class():
    model = encoder_decoder(Autoencoder)
    z = torch.cat([torch.randn(200, 8) * 0.1 + 3, torch.randn(200, 8) * 0.1 - 3])
    labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])

    class Strategy:
        @staticmethod
        def reduce(m, reduce_op):
            return m

    class Trainer:
        strategy = Strategy()

    model._trainer = Trainer()
    model._accumulate_moments(z, labels)
    model.on_train_epoch_end()
    assert torch.allclose(model.latent_mean[0], torch.full((8,), 3.0), atol=0.05)
    assert torch.allclose(model.latent_mean[1], torch.full((8,), -3.0), atol=0.05)
    assert torch.allclose(model.latent_mean[5], model.latent_mean[:2].mean(0), atol=0.05)  # unseen: pooled
    draws = model.prior(100, torch.Generator().manual_seed(0), labels=torch.ones(100, dtype=torch.long))
    assert abs(float(draws.mean()) + 3) < 0.1


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan_gp"])
def test_gan_trains_conditionally_with_every_loss(loss):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = GAN(DCGANGenerator(16, 1, 16, 16, 64, num_classes=K),
                DCGANDiscriminator(1, 16, 16, 64, norm="layer", num_classes=K, spectral_norm=loss == "hinge"),
                image_shape=SHAPE, latent_dim=16, conditional=True, num_classes=K, loss=loss, ema_decay=None)
    embed = model.discriminator.embed.weight.detach().clone()
    gain = model.generator.net[1].gain.weight.detach().clone()
    data = TensorDataset(torch.rand(16, *SHAPE) * 2 - 1, torch.randint(0, K, (16,)))
    trainer = L.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert int(model.d_steps) >= 1 and int(model.g_steps) >= 1
    assert not torch.equal(model.discriminator.embed.weight.detach(), embed)  # the projection learns
    assert not torch.equal(model.generator.net[1].gain.weight.detach(), gain)  # so do G's per-class norms


# ----------------------------------------------------------------------------- guidance
def test_guidance_mixes_conditional_and_unconditional_outputs():
    model = diffusion()
    net = model.net
    x, t, y = torch.randn(3, *SHAPE), torch.tensor([10, 400, 900]), torch.tensor([1, 4, 7])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, K))
        assert torch.allclose(model.guided_output(net, x, t, y, 1.0), cond, atol=1e-6)
        assert torch.allclose(model.guided_output(net, x, t, y, 0.0), uncond, atol=1e-6)
        assert torch.allclose(model.guided_output(net, x, t, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-5)
    info = model.sampling_info(guidance=3.0)
    assert info["guidance"] == 3.0 and info["nfe"] == 2 * 4  # both predictions per step
    assert model.sampling_info(guidance=1.0)["nfe"] == 4 and model.sampling_info(guidance=0)["nfe"] == 4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "heun"])
def test_every_sampler_and_edit_is_guided(sampler):
    from gencli.diffusion import samplers

    make = {"ddpm": samplers.DDPMSampler, "ddim": samplers.DDIMSampler, "dpmpp_2m": samplers.DPMSolverPP2M,
            "heun": samplers.HeunSampler}[sampler]
    model = diffusion()
    gen = lambda: PerImageGenerator.for_range(0, 0, 2)  # noqa: E731
    y = torch.tensor([3, 3])
    plain = model.sample(2, gen(), labels=y, sampler=make(steps=3), guidance=1.0)
    guided = model.sample(2, gen(), labels=y, sampler=make(steps=3), guidance=4.0)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)
    images = torch.rand(2, *SHAPE) * 2 - 1
    mask = torch.ones(2, 1, 16, 16)
    mask[..., 4:12, 4:12] = 0
    if sampler in ("ddpm", "ddim"):
        a = model.inpaint(images, mask, gen(), labels=y, sampler=make(steps=3), guidance=1.0, jump_length=1,
                          jump_n_sample=1)
        b = model.inpaint(images, mask, gen(), labels=y, sampler=make(steps=3), guidance=4.0, jump_length=1,
                          jump_n_sample=1)
        assert not torch.allclose(a, b)
    v = model.vary(images, 0.6, gen(), labels=y, sampler=make(steps=3), guidance=4.0)
    assert torch.isfinite(v).all()


def test_guidance_refusals():
    from gencli.diffusion.samplers import DDIMSampler

    plain = Diffusion(unet(None), image_shape=SHAPE, sampler=DDIMSampler(steps=2))
    with pytest.raises(ConfigError, match="needs a class-conditional diffusion model"):
        plain.sample(1, guidance=2.0)
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        diffusion().sample(1, guidance=-1)
    no_dropout = diffusion(label_dropout=0.0)
    with pytest.raises(ConfigError, match="label_dropout=0"):
        no_dropout.sample(1, guidance=2.0)
    assert no_dropout.sample(1, guidance=1.0).shape == (1, *SHAPE)


def test_label_dropout_trains_the_null_class():
    model = diffusion(label_dropout=0.25)
    torch.manual_seed(0)
    labels = torch.randint(0, K, (4000,))
    dropped = model.training_labels((None, labels))
    share = float((dropped == K).float().mean())
    assert 0.22 < share < 0.28
    kept = dropped != K
    assert torch.equal(dropped[kept], labels[kept])


# ----------------------------------------------------------------------------- metrics
class FakeRef:
    def __init__(self, features, labels):
        self.features, self.labels, self.n = features, labels, len(features)


def test_class_accuracy_and_intra_fid():
    from gencli.metrics.conditional import ClassAccuracy, IntraFID, frechet_distance

    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float()
    logits[:12] = torch.nn.functional.one_hot((labels[:12] + 1) % 3, 3).float()  # 12 of 60 wrong
    acc = ClassAccuracy()
    acc.begin(FakeRef(torch.zeros(5, 4), torch.zeros(5)), 60)
    acc.update(torch.zeros(30, 4), logits[:30], labels[:30])
    acc.update(torch.zeros(30, 4), logits[30:], labels[30:])
    assert acc.finish() == {"class_accuracy": pytest.approx(48 / 60)}
    assert acc.settings()["per_class"] == {0: pytest.approx(16 / 20), 1: pytest.approx(16 / 20), 2: pytest.approx(16 / 20)}
    real = torch.randn(90, 4) + torch.arange(90)[:, None] % 3
    real_labels = torch.arange(90) % 3
    fake = torch.randn(60, 4) + labels[:, None].float()
    intra = IntraFID()
    intra.begin(FakeRef(real, real_labels), 60)
    intra.update(fake, None, labels)
    value = intra.finish()["intra_fid"]
    expected = np.mean([frechet_distance(real[real_labels == k].double(), fake[labels == k].double()) for k in range(3)])
    assert value == pytest.approx(expected)
    assert intra.settings()["images_per_class"][0] == {"real": 30, "generated": 20}


def test_class_metrics_need_labels():
    from gencli.metrics.conditional import IntraFID

    intra = IntraFID()
    intra.begin(FakeRef(torch.zeros(4, 2), torch.zeros(4)), 4)
    with pytest.raises(ConfigError, match="needs the class of every generated image"):
        intra.update(torch.zeros(2, 2), None, None)


def test_labels_travel_in_samples_npz(tmp_path):
    from gencli.io import NpzImageWriter
    from gencli.metrics.sources import FileSource

    with NpzImageWriter(tmp_path / "s.npz", 4, (16, 16, 1)) as writer:
        writer.extra["labels"] = np.array([3, 1, 4, 1])
        writer.write(np.zeros((4, 16, 16, 1), np.uint8))
    source = FileSource(str(tmp_path / "s.npz"), SHAPE)
    assert source.labels_for(1, 2).tolist() == [1, 4]
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 16, 16), np.uint8), labels=np.zeros(3))
    with pytest.raises(ConfigError, match="expected one integer class per image"):
        FileSource(str(tmp_path / "bad.npz"), SHAPE)
