"""Sampling under ``hardware=`` (gencli.sampling_hardware), samplers without per-step host syncs, and the time split
of ``gencli eval`` / ``gencli sample`` (gencli.metrics.timing).

What a CPU can check: bf16/fp16 autocast sampling gives float32 images in [-1, 1] close to float32 ones, with the
same per-image noise; the profile is undone afterwards and never changes state_dict keys; torch.compile gives the
same images (a tiny MLP denoiser here: ~15-30 s of compiling on 2 cores; the UNet, ~100 s, is marked slow); no
sampler reads a tensor back per step (counted); and the eval/sample jobs record where their wall time went. What
only a GPU can show (the images/s that bf16 + compile + CUDA graphs reach) is measured there with the same jobs:
sample.json / metrics.json ``timing``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config, describe, gencli
from gencli.diffusion import samplers as samplers_module
from gencli.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2M, HeunSampler
from gencli.diffusion.schedule import NoiseSchedule
from gencli.families.autoencoder import Autoencoder
from gencli.families.diffusion import Diffusion
from gencli.families.gan import GAN
from gencli.hardware import HardwareSettings
from gencli.metrics.timing import PARTS, TimeSplit, summary_line, timed, timing
from gencli.nets.conv import ConvDecoder, ConvEncoder
from gencli.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from gencli.nets.mlp import MLPDenoiser
from gencli.nets.unet import UNet
from gencli.sampling_hardware import changes_anything, mismatch, sampling_hardware, sampling_nets
from gencli.seeds import PerImageGenerator

TINY_UNET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, norm_groups=4)
BF16 = HardwareSettings(precision="bf16-mixed", matmul_precision="high", channels_last=True)


def perturbed(model):
    """Random weights everywhere (the denoisers start with zero output layers), in eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_ddpm(ema: bool = True, timesteps: int = 100) -> Diffusion:
    torch.manual_seed(0)
    return perturbed(Diffusion(UNet(1, 8, **TINY_UNET), image_shape=(1, 8, 8), schedule=NoiseSchedule("linear", timesteps),
                               ema_decay=0.99 if ema else None))


def draw(model, n: int = 4, start: int = 0, **options) -> torch.Tensor:
    return model.sample(n, generator=PerImageGenerator.for_range(3, start, n), **options)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("sampler", [DDIMSampler(steps=10), DDPMSampler(steps=10), DPMSolverPP2M(steps=8),
                                     HeunSampler(steps=5, sigmas="karras")], ids=lambda s: s.name)
def test_bf16_autocast_sampling_gives_float32_images_close_to_float32(sampler):
    model = tiny_ddpm()
    reference = draw(model, sampler=sampler)
    with sampling_hardware(BF16, model, "cpu") as info:
        assert info["nets"] == ["net_ema"] and info["autocast"] == "bfloat16" and info["precision"] == "bf16-mixed"
        half = draw(model, sampler=sampler)
    assert half.dtype == torch.float32 and half.shape == reference.shape
    assert half.min() >= -1 and half.max() <= 1
    # bf16 keeps 8 bits of mantissa. Measured here (a random-weight UNet, which amplifies differences along the
    # path): mean |difference| 0.002-0.007, at most 1.2% of the pixels off by more than 0.1 (one of 256 by 0.5, with
    # DPM-Solver++ on a pixel between the saturated -1 and 1 regions)
    difference = (half - reference).abs()
    assert difference.mean() < 0.02 and (difference > 0.1).float().mean() < 0.03
    assert not torch.equal(half, reference)  # it really ran in bf16


def test_fp16_autocast_and_every_family_stay_float32():
    torch.manual_seed(0)
    gan = perturbed(GAN(generator=DCGANGenerator(latent_dim=8, out_channels=1, image_size=8, base_channels=8),
                        discriminator=DCGANDiscriminator(in_channels=1, image_size=8, base_channels=8),
                        image_shape=(1, 8, 8), latent_dim=8))
    ae = perturbed(Autoencoder(ConvEncoder(1, 8, 32, base_channels=8), ConvDecoder(6, 1, 8, base_channels=8),
                               image_shape=(1, 8, 8), latent_dim=6))
    for model, nets in ((gan, ["generator_ema"]), (ae, ["decoder", "encoder"]), (tiny_ddpm(), ["net_ema"])):
        reference = draw(model)
        for precision in ("bf16-mixed", "16-mixed"):
            with sampling_hardware(HardwareSettings(precision=precision), model, "cpu") as info:
                assert info["nets"] == nets
                out = draw(model)
            assert out.dtype == torch.float32 and (out - reference).abs().max() < 0.15, (type(model), precision)


def test_autocast_keeps_each_images_noise_independent_of_the_batch(monkeypatch):
    """x_T and every DDPM step's noise come from the per-image generators, in float32, whatever the profile."""
    drawn: list[torch.Tensor] = []
    original = samplers_module.randn

    def recording(shape, like, generator):
        noise = original(shape, like, generator)
        drawn.append(noise.clone())
        return noise

    monkeypatch.setattr(samplers_module, "randn", recording)
    model = tiny_ddpm()
    sampler = DDPMSampler(steps=6)

    def noise_of(batches) -> list[torch.Tensor]:
        start, per_batch = 0, []
        for b in batches:  # what model.sample does, with x_T kept
            drawn.clear()
            generator = PerImageGenerator.for_range(3, start, b)
            x_T = model.prior(b, generator)
            sampler.sample(model.denoiser(model.sampling_net()), model.schedule, x_T, generator)
            per_batch.append(torch.stack([x_T, *drawn], 1))  # (b, steps: x_T and the noise of all steps but the last)
            start += b
        return torch.cat(per_batch)

    fp32 = noise_of([4])
    with sampling_hardware(BF16, model, "cpu"):
        split = noise_of([2, 1, 1])
    assert split.dtype == torch.float32 and torch.equal(split, fp32)


def test_the_profile_is_undone_and_never_changes_state_dict_keys():
    model = tiny_ddpm()
    keys = list(model.state_dict())
    before = draw(model)
    with sampling_hardware(BF16, model, "cpu"):
        assert "forward" in model.net_ema.__dict__ and "forward" not in model.net.__dict__  # only the net that samples
        assert model.net_ema.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert list(model.state_dict()) == keys
    assert "forward" not in model.net_ema.__dict__
    assert model.net_ema.conv_in.weight.is_contiguous()
    assert torch.get_float32_matmul_precision() == "highest"  # set only while the net runs
    assert torch.equal(draw(model), before)
    with sampling_hardware(BF16, model, "cpu", use_ema=False) as info:  # the raw net, when asked for
        assert info["nets"] == ["net"] and "forward" in model.net.__dict__
    assert "forward" not in model.net.__dict__


def test_the_default_profile_changes_nothing():
    model = tiny_ddpm()
    default = instantiate(OmegaConf.load(Path(__file__).parents[2] / "conf" / "hardware" / "default.yaml"))
    assert not changes_anything(default)
    with sampling_hardware(default, model, "cpu") as info:
        assert info["nets"] == [] and "forward" not in model.net_ema.__dict__
        assert info["precision"] == "32-true" and info["autocast"] is None and info["compile"] is False


def test_a_gpu_profile_on_a_cpu_is_a_warning_naming_what_sampling_uses():
    gpu_fast = instantiate(OmegaConf.load(Path(__file__).parents[2] / "conf" / "hardware" / "gpu_fast.yaml"))
    text = mismatch(gpu_fast, "cpu", "gpu_fast")
    assert text.startswith("hardware=gpu_fast is made for a GPU") and "precision=bf16-mixed" in text
    assert "compile=true" in text and "pin_memory" not in text  # loaders do not sample
    assert mismatch(gpu_fast, "cuda", "gpu_fast") is None
    assert mismatch(HardwareSettings(channels_last=True), "cpu") is None


def test_sampling_nets_of_each_family():
    model = tiny_ddpm(ema=False)
    assert list(sampling_nets(model)) == ["net"]
    assert list(sampling_nets(tiny_ddpm())) == ["net_ema"]


# ----------------------------------------------------------------------------- compile
def test_compiled_denoiser_samples_the_same_images():
    """torch.compile on the CPU (inductor's C++ kernels) of a tiny MLP denoiser: ~15-30 s here, mostly compiling."""
    torch.manual_seed(0)
    model = perturbed(Diffusion(MLPDenoiser(6, hidden=32, depth=2), image_shape=(1, 8, 8), x_shape=(6,),
                                schedule=NoiseSchedule("linear", 100), ema_decay=0.99))
    keys, sampler = list(model.state_dict()), DDIMSampler(steps=5)
    eager = draw(model, sampler=sampler)
    with sampling_hardware(HardwareSettings(compile=True), model, "cpu") as info:
        assert info["compile"] and info["compile_mode"] == "default"
        compiled = draw(model, sampler=sampler)
        assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert "forward" not in model.net_ema.__dict__


@pytest.mark.slow
def test_gpu_fast_sample_job_on_a_cpu_compiles_the_unet(ddpm_ckpt, tmp_path, caplog):
    """The whole gpu_fast profile through the sample job on a CPU: bf16 + channels-last + a compiled UNet (~100 s of
    compiling on 2 cores, hence slow). It warns, and its images are close to the default profile's."""
    import numpy as np

    from gencli.jobs.sample import sample

    runs = {}
    for name, extra in (("plain", []), ("fast", ["hardware=gpu_fast"])):
        runs[name] = tmp_path / name
        cfg = compose_config("sample", [f"ckpt={ddpm_ckpt}", "n=6", "batch_size=3", "device=cpu", *extra], runs[name])
        with caplog.at_level(logging.WARNING):
            sample(cfg)
    plain, fast = runs["plain"], runs["fast"]
    info = json.loads((fast / "sample.json").read_text())
    assert info["sampling"]["hardware"]["compile"] is True and info["sampling"]["hardware"]["autocast"] == "bfloat16"
    assert "made for a GPU" in caplog.text
    a, b = (np.load(d / "samples.npz")["images"].astype(int) for d in (plain, fast))
    assert np.abs(a - b).max() <= 40  # uint8 levels; bf16 noise on a random-weight UNet


# ----------------------------------------------------------------------------- no per-step host syncs
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts calls of the Tensor methods that read a tensor back to the host (each a GPU sync there)."""
    counts = {"n": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def syncs_of(counter, run) -> int:
    before = counter["n"]
    run()
    return counter["n"] - before


@pytest.mark.parametrize("make", [
    lambda k: DDIMSampler(steps=k), lambda k: DDIMSampler(steps=k, eta=1.0), lambda k: DDPMSampler(steps=k),
    lambda k: DPMSolverPP2M(steps=k), lambda k: DPMSolverPP2M(steps=k, sigmas="karras"),
    lambda k: HeunSampler(steps=k), lambda k: HeunSampler(steps=k, sigmas="karras"),
], ids=["ddim", "ddim_eta1", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "heun", "heun_karras"])
def test_no_sampler_reads_a_tensor_back_at_every_step(make, sync_counter):
    model = tiny_ddpm()
    draw(model, n=2, sampler=make(3))  # the schedule's number tables are made once, on first use
    few = syncs_of(sync_counter, lambda: draw(model, n=2, sampler=make(5)))
    many = syncs_of(sync_counter, lambda: draw(model, n=2, sampler=make(50)))
    # per pass, not per step: none for ddim/ddpm and the discrete solvers; with Karras sigmas 3 tolist() of CPU
    # tables (the sigma range, twice, and the levels' sigmas)
    assert many == few <= 3, (few, many)


@pytest.mark.parametrize("method", ["repaint", "replace"])
def test_editing_reads_no_tensor_back_per_step(method, sync_counter):
    model = tiny_ddpm()
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1

    def inpaint(k: int):
        return model.inpaint(images, mask, PerImageGenerator.for_range(0, 0, 2), sampler=DDPMSampler(steps=k),
                             method=method, jump_length=2, jump_n_sample=2)

    def vary(k: int):
        return model.vary(images, 0.6, PerImageGenerator.for_range(0, 0, 2), sampler=DPMSolverPP2M(steps=k,
                                                                                                  sigmas="karras"))

    for run in (inpaint, vary):
        run(3)
        assert syncs_of(sync_counter, lambda run=run: run(6)) == syncs_of(sync_counter, lambda run=run: run(40))


def test_fractional_alpha_bar_is_computed_on_the_device_with_the_same_values():
    schedule = NoiseSchedule("cosine", 1000)
    like = torch.zeros(3, 1, 2, 2)
    for t in (12.25, 998.5, 0.75, 500.0):
        got = schedule.alpha_bar_at(torch.full((3,), t, dtype=torch.float64), like)
        want = (schedule.alphas_cumprod[int(t)] if float(t).is_integer()
                else torch.tensor(1.0 / (1.0 + schedule.sigma_at(t) ** 2), dtype=torch.float64))
        assert torch.equal(got.flatten(), want.to(torch.float32).expand(3)), t
    levels = [0, 3.5, 999, 120.125]
    assert schedule.sigmas_at(levels) == [schedule.sigma_at(level) for level in levels]


# ----------------------------------------------------------------------------- the time split
def test_nested_parts_count_once_and_never_exceed_the_wall_time():
    now = [0.0]
    split = TimeSplit("cpu", clock=lambda: now[0])
    with timing(split):
        with timed("io"):
            now[0] += 1
            with timed("features"):  # reading inside feature extraction: the inner part only
                now[0] += 2
            now[0] += 0.5
        with timed("generation", images=8):
            now[0] += 4
        with timed("generation", images=8):
            now[0] += 2
        now[0] += 0.5  # nothing timed: other
    report = split.report()
    assert report["io_seconds"] == 1.5 and report["features_seconds"] == 2 and report["generation_seconds"] == 6
    assert report["other_seconds"] == 0.5 and report["total_seconds"] == 10
    assert report["generation_images_per_second"] == 16 / 6
    assert report["first_batch_seconds"] == 4 and report["generation_images_per_second_after_first_batch"] == 4
    assert "generation 6 s (60%, 2.667 img/s)" in summary_line(report)
    with timed("io"):  # no active split: nothing happens
        pass


# a tiny DDPM checkpoint as 'gencli train' writes one (weights perturbed, EMA differing from the raw net)
DDPM = ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.norm_groups=4", "model.net.ch_mult=[1,2]",
        "model.net.num_res_blocks=1", "model.net.attn_resolutions=[4]", "data=digits", "data.image_size=8",
        "model.sampler.steps=5", "model.ema_decay=0.99", "model.schedule.timesteps=30"]


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory) -> Path:
    from gencli.checkpoints import atomic_save

    path = tmp_path_factory.mktemp("ddpm") / "ddpm.ckpt"
    cfg = compose_config("train", DDPM, path.parent / "train_run")
    model = perturbed(instantiate(cfg.model))
    model.run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    atomic_save(checkpoint, path)
    return path


def check_split(timing_report: dict, parts: tuple[str, ...]) -> None:
    seconds = [timing_report[f"{name}_seconds"] for name in PARTS]
    assert all(s >= 0 for s in seconds) and timing_report["other_seconds"] >= 0
    assert sum(seconds) <= timing_report["total_seconds"] + 1e-9
    for name in parts:
        assert timing_report[f"{name}_seconds"] > 0, name
    assert timing_report["synchronized"] is False  # a CPU: nothing to wait for


def test_eval_records_and_prints_where_the_time_went(compose_cfg, ddpm_ckpt, capsys, caplog):
    from gencli.jobs.evaluate import evaluate

    cfg = compose_cfg("eval", [f"ckpt={ddpm_ckpt}", "metric=fid", "features=domain", "features.epochs=1",
                               "features.min_accuracy=0", "n=12", "batch_size=6", "device=cpu",
                               "hardware=gpu_fast", "hardware.compile=false"])
    with caplog.at_level(logging.WARNING):
        report = evaluate(cfg)
    assert "hardware=gpu_fast is made for a GPU" in caplog.text
    spent = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["timing"]
    check_split(spent, ("generation", "features", "io", "setup", "metrics"))
    assert spent["images_generated"] == 12 and spent["generation_images_per_second"] > 0
    assert spent == report["timing"]
    assert summary_line(spent) in capsys.readouterr().out
    hardware = report["provenance"]["run"]["sampling"]["hardware"]
    assert hardware["profile"] == "gpu_fast" and hardware["precision"] == "bf16-mixed" and hardware["compile"] is False
    assert report["provenance"]["fid"]["generated"]["sampling"]["hardware"] == hardware


def test_sample_records_its_time_and_hardware(compose_cfg, ddpm_ckpt):
    from gencli.jobs.sample import sample

    cfg = compose_cfg("sample", [f"ckpt={ddpm_ckpt}", "n=5", "batch_size=2", "device=cpu"])
    sample(cfg)
    info = json.loads((Path(cfg.paths.output_dir) / "sample.json").read_text())
    check_split(info["timing"], ("generation", "io"))
    assert info["timing"]["images_generated"] == 5 and info["timing"]["first_batch_seconds"] > 0
    assert info["sampling"]["hardware"]["profile"] == "default" and info["sampling"]["hardware"]["nets"] == []


# ----------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("verb", ["sample", "eval"])
def test_hardware_composes_for_sample_and_eval(verb, tmp_path):
    shown = gencli(verb, "ckpt=x.ckpt", "hardware=gpu_fast", "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0, describe(shown)
    hardware = OmegaConf.create(shown.stdout).hardware
    assert hardware.precision == "bf16-mixed" and hardware.compile is True and hardware.channels_last is True
    assert hardware.matmul_precision == "high" and hardware.compile_mode == "default"
    default = gencli(verb, "ckpt=x.ckpt", "--cfg", "job", cwd=tmp_path)
    assert OmegaConf.create(default.stdout).hardware.precision == "32-true"


def test_the_sampling_profile_builds_only_an_allow_listed_class():
    from gencli.errors import ConfigError
    from gencli.jobs.common import sampling_settings

    cfg = OmegaConf.create({"hardware": {"_target_": "gencli.hardware.HardwareSettings", "precision": "bf16-mixed"}})
    settings, _ = sampling_settings(cfg, torch.device("cuda"))
    assert isinstance(settings, HardwareSettings) and settings.precision == "bf16-mixed"
    bad = OmegaConf.create({"hardware": {"_target_": "os.system", "_args_": ["true"]}})
    with pytest.raises(ConfigError, match=r"hardware=.*os.system.*Nothing was built"):
        sampling_settings(bad, torch.device("cpu"))


# ----------------------------------------------------------------------------- setup is not I/O (issue 24, item 5)
SLOW = 0.4  # seconds added to what is timed, far above this machine's noise for the small parts


def slowed(fn):
    def run(*args, **kwargs):
        time.sleep(SLOW)
        return fn(*args, **kwargs)

    return run


def slow_backend(gm, example_inputs):
    """A torch.compile backend that takes SLOW seconds to 'compile' and then runs the graph as it is."""
    time.sleep(SLOW)
    return gm.forward


def test_sample_counts_loading_building_and_compiling_as_setup(compose_cfg, ddpm_ckpt, monkeypatch):
    """gencli sample on a GPU counted checkpoint loading and CUDA start-up as I/O (13.7 of 25 s): loading the
    checkpoint and building the model (slowed here by SLOW), moving it to the device and the compiled net's first call
    (a backend that spends SLOW compiling) are setup; I/O is only the files written."""
    import gencli.hardware
    import gencli.jobs.sample
    from gencli.jobs.sample import sample

    monkeypatch.setattr(gencli.jobs.sample, "restore_model", slowed(gencli.jobs.sample.restore_model))
    monkeypatch.setattr(gencli.hardware, "compile_backend", slow_backend)
    torch._dynamo.reset()
    cfg = compose_cfg("sample", [f"ckpt={ddpm_ckpt}", "n=4", "batch_size=2", "device=cpu", "hardware.compile=true"])
    sample(cfg)
    info = json.loads((Path(cfg.paths.output_dir) / "sample.json").read_text())
    spent = info["timing"]
    check_split(spent, ("generation", "io", "setup"))
    assert spent["setup_seconds"] >= 2 * SLOW  # the load and the compile
    assert spent["io_seconds"] < SLOW and spent["generation_seconds"] < spent["setup_seconds"]
    assert "CUDA start-up" in spent["note"] and info["sampling"]["hardware"]["compile"] is True
    torch._dynamo.reset()


def test_eval_counts_loading_the_checkpoint_as_setup(compose_cfg, ddpm_ckpt, monkeypatch):
    import gencli.jobs.evaluate
    from gencli.jobs.evaluate import evaluate

    monkeypatch.setattr(gencli.jobs.evaluate, "restore_model", slowed(gencli.jobs.evaluate.restore_model))
    cfg = compose_cfg("eval", [f"ckpt={ddpm_ckpt}", "metric=fid", "features=domain", "features.epochs=1",
                               "features.min_accuracy=0", "n=6", "batch_size=6", "device=cpu"])
    spent = evaluate(cfg)["timing"]
    assert spent["setup_seconds"] >= SLOW and spent["io_seconds"] < SLOW


def test_the_time_split_does_not_start_cuda(monkeypatch):
    """A part's boundary waits for the GPU only once CUDA has started: waiting earlier would start CUDA between two
    parts, its seconds counted for none (they belong to setup, where the model moves to the device)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    split = TimeSplit("cuda")
    with split.part("setup"):
        pass
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with split.part("generation"):
        pass
    assert len(calls) == 2
