"""`gencli train model=X` with nothing else is a first try: small nets on the embedded digits and a CPU trainer.

The diffusion net follows where the run trains (conf/model/ddpm.yaml): the small CPU UNet on a CPU trainer or the
embedded digits, the paper's UNet on a GPU trainer with real data and in the GPU recipes; model/net= picks any."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from gencli.config import cpu_or_digits, group_options, trains_on_cpu_or_digits

# Models that need an extra file to instantiate (latent diffusion: a first-stage checkpoint) are composed only.
NEEDS_FILES = {"ldm"}
# what a first try may train on a 2-core CPU in about a minute
FIRST_TRY_PARAMS = 2_000_000
PAPER_UNET = "unet_ddpm_cifar10"


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", [m for m in group_options("model") if m not in NEEDS_FILES])
def test_every_default_model_is_small(compose_cfg, model):
    cfg = compose_cfg("train", [f"model={model}"])
    assert cfg.trainer.accelerator == "cpu" and cfg.data._target_.endswith("DigitsDataModule")
    assert trainable(instantiate(cfg.model)) < FIRST_TRY_PARAMS


@pytest.mark.parametrize("model, net", [("ddpm", "unet_cpu"), ("ldm", "mlp_latent")])
def test_diffusion_first_tries_get_the_small_net(compose_cfg, model, net):
    cfg = compose_cfg("train", [f"model={model}"])
    assert cfg.hydra.runtime.choices["model/net"] == net


@pytest.mark.parametrize("overrides, net", [
    (["trainer=gpu", "data=cifar10"], PAPER_UNET),
    (["trainer=ddp", "data=mnist"], PAPER_UNET),
    (["trainer=gpu"], "unet_cpu"),  # the embedded digits
    (["data=cifar10"], "unet_cpu"),  # trainer=cpu, the default
    (["trainer=ddp_cpu", "data=cifar10"], "unet_cpu"),
    (["trainer=gpu", "data=cifar10", "model/net=unet_cpu"], "unet_cpu"),  # the user's choice wins
    (["model/net=unet_ddpm_cifar10"], PAPER_UNET),
])
def test_the_diffusion_net_follows_the_trainer_and_data(compose_cfg, overrides, net):
    cfg = compose_cfg("train", ["model=ddpm", *overrides])
    assert cfg.hydra.runtime.choices["model/net"] == net
    assert cfg.model.net.ch == (128 if net == PAPER_UNET else 32)


@pytest.mark.parametrize("experiment, net", [("ddpm_cifar10", PAPER_UNET), ("cddpm_cifar10", PAPER_UNET),
                                             ("ddpm_mnist_cpu", "unet_cpu"), ("cddpm_mnist_cpu", "unet_cpu")])
def test_recipes_keep_their_net(compose_cfg, experiment, net):
    for trainer in ("cpu", "gpu"):
        cfg = compose_cfg("train", [f"experiment={experiment}", f"trainer={trainer}"])
        assert cfg.hydra.runtime.choices["model/net"] == net


def test_the_small_unet_is_small_and_the_paper_unet_is_the_papers(compose_cfg):
    small = instantiate(compose_cfg("train", ["model=ddpm"]).model.net)
    assert trainable(small) < FIRST_TRY_PARAMS
    paper = compose_cfg("train", ["model=ddpm", "trainer=gpu", "data=cifar10"]).model.net
    assert (paper.ch, list(paper.ch_mult), paper.num_res_blocks) == (128, [1, 2, 2, 2], 2)


def test_the_rule_reads_the_group_files():
    assert trains_on_cpu_or_digits("cpu", "mnist") and trains_on_cpu_or_digits("default", "mnist")
    assert trains_on_cpu_or_digits("gpu", "digits")
    assert not trains_on_cpu_or_digits("gpu", "folder")
    assert trains_on_cpu_or_digits("no_such_trainer", "cifar10")  # unknown: small trains anywhere
    assert cpu_or_digits("gpu", "cifar10", "small", "large") == "large"
