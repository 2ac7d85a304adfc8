"""Every recipe in conf/experiment/ and every family, one training step under the GPU profile's settings on a CPU,
then a sample and an eval from its checkpoint (issue 24, item 1): what breaks under hardware=gpu_fast on any device
(capture, AOTAutograd, dtypes, mutations, the compile guard, channels-last inputs) breaks here, in CI.

What it cannot catch: failures of a GPU's own kernels and layouts. The dcgan_cifar10 crash of issue 24 was one
(pytorch/pytorch#171622, Inductor's predicted convolution_backward strides against cuDNN's under channels-last,
which does not reproduce on a CPU); that class of bug is guarded by the structural check in
tests/unit/test_dcgan_layout.py (no convolution sees a 1x1 map), not by this run.

The GPU profile's settings, as ``trainer=gpu hardware=gpu_fast`` runs them, less what only a GPU has: bf16 autocast
(``bf16-mixed``), channels-last nets and inputs, torch.compile of every trained net behind the compile guard, fused
optimisers, TF32-style matmul precision, ``host_sync=log`` (the finite checks stay on the device) and the training
images kept on the training device as uint8 (``data_on_device=true``). Loader workers and pinned memory are off
(they only feed a GPU). The nets, images (8x8) and batches (4) are shrunk so that the whole file takes a few
minutes on 2 cores.

Compiling: torch.compile runs Dynamo, AOTAutograd (forward/backward split, functionalisation) and Inductor's
decompositions and partitioner for every recipe (the ``aot_eager_decomp_partition`` backend: the graphs Inductor
would lower, run by eager kernels); that is where a net that cannot be captured, a double backward, a dtype or a
mutation problem shows, on any device. Inductor's own code generation differs by device (C++ here, Triton on a GPU),
so it is run for real on one recipe only (``dcgan_cifar10``, the one whose GPU run crashed; Inductor's C++ path
here says nothing about its Triton path there), with a compile cache shared between runs (``GENCLI_TEST_INDUCTOR_CACHE``, default ``~/.cache/gencli-tests/inductor``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from gencli.config import CONF_DIR

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))

#: hardware=gpu_fast on a CPU: everything but the loader workers and pinned memory, and channels-last on even where a
#: recipe turns it off for speed (dcgan_cifar10): the layout that broke on a GPU is the one to run here
GPU_PROFILE = ["trainer=cpu", "hardware=gpu_fast", "hardware.channels_last=true", "hardware.num_workers=0",
               "hardware.pin_memory=false", "hardware.data_on_device=true"]
#: one training batch, one validation batch
ONE_STEP = ["trainer.max_epochs=1", "trainer.max_steps=-1", "trainer.max_time=null", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1",
            "callbacks.sample_grid.n=4"]
SMALL_DATA = ["data.image_size=8", "data.batch_size=4", "data.global_batch_size=null"]
UNET = ["model.net.ch=8", "model.net.ch_mult=[1,2]", "model.net.num_res_blocks=1", "model.net.attn_resolutions=[4]",
        "model.net.norm_groups=4", "model.schedule.timesteps=30", "model.schedule.beta_start=null",
        "model.schedule.beta_end=null", "model.sampler.steps=null", "model.scheduler.warmup_steps=1"]
GAN = ["model.generator.base_channels=4", "model.discriminator.base_channels=4", "model.latent_dim=8"]
CONV_AE = ["model.encoder.base_channels=4", "model.decoder.base_channels=4", "model.encoder.out_features=16",
           "model.latent_dim=4"]
MLP_LATENT = ["model.net.hidden=16", "model.net.depth=2", "model.net.time_dim=8", "model.schedule.timesteps=30",
              "model.sampler.steps=null", "model.scheduler.warmup_steps=1"]
#: the shrinking each recipe needs, by the family its model is
SHRINK = {
    "cddpm_cifar10": UNET, "cddpm_mnist_cpu": UNET, "ddpm_cifar10": UNET, "ddpm_mnist_cpu": UNET,
    "cgan_mnist_cpu": GAN, "dcgan_cifar10": GAN, "gan_mnist_cpu": GAN, "wgan_gp_cifar10": GAN,
    "cvae_mnist": CONV_AE, "vae_mnist": CONV_AE,
    "ldm_mnist_cpu": MLP_LATENT,
}
#: families no recipe trains, each as its model config
FAMILIES = {"ae": ["model=ae", "data=mnist", *CONV_AE[:3], "model.latent_dim=4"],
            "classifier": ["model=classifier", "data=mnist"]}


def test_every_recipe_is_covered():
    assert sorted(SHRINK) == EXPERIMENTS, "a new recipe needs its shrinking in SHRINK (and runs below by itself)"


@pytest.fixture
def backend(monkeypatch):
    """The nets compile through Dynamo + AOTAutograd + Inductor's decompositions, run by eager kernels."""
    import gencli.hardware

    monkeypatch.setattr(gencli.hardware, "compile_backend", "aot_eager_decomp_partition")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def data_args(experiment_or_data: str, mnist_root: Path, cifar_root: Path) -> list[str]:
    return [f"data.root={cifar_root if 'cifar' in experiment_or_data else mnist_root}"]


def train_one_step(overrides: list[str], out: Path) -> dict:
    from gencli.jobs.train import train

    cfg = compose_config("train", [*overrides, *GPU_PROFILE, *ONE_STEP, *SMALL_DATA], out)
    assert cfg.hardware.compile and cfg.hardware.channels_last and cfg.hardware.precision == "bf16-mixed"
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics
    assert metrics["steps"] >= 1
    assert metrics["compile"] != "fell back" and not str(metrics["compile"]).startswith("fell back"), metrics["compile"]
    assert metrics["compile"].startswith("compiled"), metrics["compile"]
    return metrics


def sample_and_eval(ckpt: Path, out: Path, encoder: bool, conditional: bool = False) -> None:
    from gencli.jobs.evaluate import evaluate
    from gencli.jobs.sample import sample

    cfg = compose_config("sample", [f"ckpt={ckpt}", "n=2", "batch_size=2", "device=cpu", "hardware=gpu_fast"],
                         out / "sample")
    sample(cfg)
    info = json.loads((out / "sample" / "sample.json").read_text())
    hardware = info["sampling"]["hardware"]
    assert hardware["compile"] is True and hardware["channels_last"] and hardware["autocast"] == "bfloat16", hardware
    assert info["timing"]["images_generated"] == 2
    metric = ["metric=recon"] if encoder else ["metric=kid", "features=domain", "features.epochs=1",
                                               "features.min_accuracy=0", "metric.kid.subset_size=2"]
    # a conditional model is also judged per class (intra-FID): enough images of each class on both sides
    size = ["split=train", "n=40", "batch_size=20", "reference.n=null"] if conditional else \
        ["n=4", "batch_size=2", "reference.n=8"]
    cfg = compose_config("eval", [f"ckpt={ckpt}", *metric, *size, "device=cpu", "hardware=gpu_fast"], out / "eval")
    report = evaluate(cfg)
    assert report["metrics"] and all(v == v for v in report["metrics"].values() if isinstance(v, float)), report
    if report["provenance"]["run"]["sampling"] is not None:
        assert report["provenance"]["run"]["sampling"]["hardware"]["compile"] is True


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e != "ldm_mnist_cpu"])
def test_each_recipe_one_step_under_the_gpu_profile(experiment, backend, mnist_root, cifar_root, tmp_path):
    metrics = train_one_step([f"experiment={experiment}", *SHRINK[experiment],
                              *data_args(experiment, mnist_root, cifar_root)], tmp_path / "train")
    if experiment.startswith("wgan_gp"):  # the critic's double backward: it runs eagerly, the generator compiled
        assert metrics["compile_nets"]["discriminator"].startswith("eager"), metrics
        assert metrics["compile_nets"]["generator"] == "compiled"
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    sample_and_eval(ckpt, tmp_path, encoder="vae" in experiment, conditional=experiment.startswith("c"))


def test_latent_diffusion_recipe_on_its_first_stage(backend, mnist_root, tmp_path):
    """ldm_mnist_cpu needs a first stage: the vae_mnist recipe's checkpoint, both under the GPU profile."""
    train_one_step(["experiment=vae_mnist", *SHRINK["vae_mnist"], f"data.root={mnist_root}"], tmp_path / "vae")
    first_stage = tmp_path / "vae" / "checkpoints" / "last.ckpt"
    train_one_step(["experiment=ldm_mnist_cpu", *SHRINK["ldm_mnist_cpu"], f"model.first_stage_ckpt={first_stage}",
                    f"data.root={mnist_root}"], tmp_path / "ldm")
    sample_and_eval(tmp_path / "ldm" / "checkpoints" / "last.ckpt", tmp_path, encoder=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_without_a_recipe(family, backend, mnist_root, tmp_path):
    train_one_step([*FAMILIES[family], f"data.root={mnist_root}"], tmp_path / "train")
    if family == "ae":
        sample_and_eval(tmp_path / "train" / "checkpoints" / "last.ckpt", tmp_path, encoder=True)


def test_dcgan_recipe_through_inductor(cifar_root, tmp_path, monkeypatch):
    """The recipe whose GPU run crashed, through Inductor for real (C++ kernels here), with a compile cache shared
    between runs: trains compiled (no fallback), and its weights come out finite."""
    cache = Path(os.environ.get("GENCLI_TEST_INDUCTOR_CACHE", Path.home() / ".cache" / "gencli-tests" / "inductor"))
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    metrics = train_one_step(["experiment=dcgan_cifar10", *SHRINK["dcgan_cifar10"], f"data.root={cifar_root}"],
                             tmp_path / "train")
    assert metrics["compile_nets"] == {"generator": "compiled", "discriminator": "compiled"}
    state = torch.load(tmp_path / "train" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    torch._dynamo.reset()


def _backward_fails(gm, example_inputs):
    def run(args):
        raise AssertionError("expected size 256==256, stride 16==1 at dim=1\nError in op: "
                             "torch.ops.aten.convolution_backward.default")

    run._boxed_call = True
    return run


def test_the_compile_guard_through_the_train_and_sample_jobs(mnist_root, tmp_path, monkeypatch, caplog):
    """A backend whose compiled backward fails (as Inductor's did on the GPU): gencli train trains on, prints one
    paragraph per net, metrics.json says compile: "fell back (...)", and the weights equal a hardware.compile=false
    run's bit for bit; gencli sample records its own fallback in sample.json."""
    import logging

    from torch._dynamo.backends.common import aot_autograd

    import gencli.hardware
    from gencli.jobs.train import train

    recipe = ["experiment=gan_mnist_cpu", *SHRINK["gan_mnist_cpu"], f"data.root={mnist_root}"]
    cfg = compose_config("train", [*recipe, *GPU_PROFILE, *ONE_STEP, *SMALL_DATA, "hardware.compile=false"],
                         tmp_path / "eager")
    cfg.trainer.limit_train_batches = 3  # past the first step, where the guard's trials run
    train(cfg)
    monkeypatch.setattr(gencli.hardware, "compile_backend",
                        aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=_backward_fails))
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="gencli.hardware"):
        cfg = compose_config("train", [*recipe, *GPU_PROFILE, *ONE_STEP, *SMALL_DATA], tmp_path / "guarded")
        cfg.trainer.limit_train_batches = 3
        train(cfg)
    metrics = json.loads((tmp_path / "guarded" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 6  # 3 batches, a D and a G step each
    assert metrics["compile"].startswith("fell back (generator: AssertionError: expected size 256==256"), metrics
    assert metrics["compile_nets"]["discriminator"].startswith("fell back (AssertionError")
    paragraphs = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(paragraphs) == 2 and all("hardware.compile=false" in p for p in paragraphs)
    eager = torch.load(tmp_path / "eager" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    guarded = torch.load(tmp_path / "guarded" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert list(guarded) == list(eager)
    for key in eager:
        assert torch.equal(guarded[key], eager[key]), key

    def fails_to_compile(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(gencli.hardware, "compile_backend", fails_to_compile)
    torch._dynamo.reset()
    from gencli.jobs.sample import sample

    cfg = compose_config("sample", [f"ckpt={tmp_path / 'guarded' / 'checkpoints' / 'last.ckpt'}", "n=2",
                                    "batch_size=2", "device=cpu", "hardware=gpu_fast"], tmp_path / "sample")
    sample(cfg)
    hardware = json.loads((tmp_path / "sample" / "sample.json").read_text())["sampling"]["hardware"]
    assert hardware["compile"].startswith("fell back (RuntimeError: no compiler here"), hardware
    torch._dynamo.reset()
