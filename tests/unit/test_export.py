"""gencli export: the safetensors + JSON pair round trip (weights, EMA choice, sampling), its refusals, and the
diffusers DDPMPipeline folder checked against gencli's own UNet and DDPM sampler."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import compose_config, describe, gencli
from gencli.checkpoints import atomic_save, load_checkpoint, restore_model
from gencli.diffusion.samplers import DDPMSampler
from gencli.errors import ConfigError
from gencli.exports import check_use_ema
from gencli.jobs.export import export

# A UNet with three levels, two blocks per level and attention at 4x4: every kind of block the mapping handles.
DDPM = ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.norm_groups=4", "model.net.ch_mult=[1,2,2]",
        "model.net.num_res_blocks=2", "model.net.attn_resolutions=[4]", "data=digits", "data.image_size=8",
        "model.sampler.steps=5", "model.ema_decay=0.99", "model.schedule.timesteps=30"]
AE = ["model=ae", "data=digits", "data.image_size=8", "model.latent_dim=6", "model.encoder.base_channels=8",
      "model.decoder.base_channels=8"]


def make_checkpoint(path: Path, overrides: list[str], prepare=None) -> Path:
    """A gencli checkpoint (the state dict and the gencli record 'gencli train' writes) of a model whose every
    weight is perturbed: no block is the identity its zero-initialised last conv makes it, and an EMA copy differs
    from the raw net, so the tests can tell all of them apart."""
    cfg = compose_config("train", overrides, path.parent / f"{path.stem}_run")
    model = instantiate(cfg.model)
    model.run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
        if prepare is not None:
            prepare(model)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)  # the family's own record (latent diffusion adds its first stage's config)
    atomic_save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ddpm") / "ddpm.ckpt", DDPM)


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ae") / "ae.ckpt", AE)


def run_export(tmp_path: Path, ckpt: Path, *overrides: str) -> Path:
    """The export job, in process, as the CLI composes it; returns the run folder."""
    run_dir = tmp_path / "export_run"
    cfg = compose_config("export", [f"ckpt={ckpt}", *overrides], run_dir)
    export(cfg)
    return run_dir


def draw(model, n: int = 3, **options) -> torch.Tensor:
    return model.sample(n, generator=torch.Generator().manual_seed(7), **options)


# ----------------------------------------------------------------------------- safetensors round trip
def test_ema_export_holds_the_ema_weights_and_samples_as_the_checkpoint(ddpm_ckpt, tmp_path):
    run_dir = run_export(tmp_path, ddpm_ckpt)
    weights, meta = run_dir / "model.safetensors", run_dir / "model.json"
    record = json.loads(meta.read_text())
    assert record["weights"] == "ema" and record["ema_modules"] == {"net": "net_ema"}
    assert record["gencli"]["family"] == "Diffusion" and record["gencli"]["config"]["model"]["ema_decay"] == 0.99
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    source = torch.load(ddpm_ckpt, weights_only=True)["state_dict"]
    tensors = load_file(weights)
    assert not any(k.startswith("net_ema.") for k in tensors)
    assert set(tensors) == {k for k in source if not k.startswith("net_ema.")}
    for key, value in tensors.items():  # the EMA copy's weights under the net's names; the rest as they were
        expected = source["net_ema." + key[4:]] if key.startswith("net.") else source[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(source["net.conv_in.weight"], source["net_ema.conv_in.weight"])  # the test can tell

    original, _ = restore_model(ddpm_ckpt)
    exported, _ = restore_model(weights)
    torch.testing.assert_close(draw(exported), draw(original), rtol=0, atol=0)  # default: EMA in both
    assert not torch.equal(draw(exported), draw(original, use_ema=False))
    assert exported.sampling_info()["weights"] == "ema"
    check_use_ema(exported, True)
    with pytest.raises(ConfigError, match="holds only the EMA weights"):
        check_use_ema(exported, False)
    # the JSON names the pair too, and the data config comes along for sample/eval
    assert load_checkpoint(meta)["gencli"]["config"]["data"]["_target_"] == "gencli.data.DigitsDataModule"


def test_raw_export_samples_as_the_checkpoints_raw_net(ddpm_ckpt, tmp_path):
    run_dir = run_export(tmp_path, ddpm_ckpt, "use_ema=false", "out=" + str(tmp_path / "raw" / "net.safetensors"))
    assert not (run_dir / "model.safetensors").exists()
    weights = tmp_path / "raw" / "net.safetensors"
    assert json.loads((tmp_path / "raw" / "net.json").read_text())["weights"] == "raw"
    original, _ = restore_model(ddpm_ckpt)
    exported, _ = restore_model(weights)
    torch.testing.assert_close(draw(exported), draw(original, use_ema=False), rtol=0, atol=0)
    assert exported.net_ema is None and exported.sampling_info()["weights"] == "raw"
    with pytest.raises(ConfigError, match="holds only the raw weights"):
        check_use_ema(exported, True)
    summary = json.loads((run_dir / "export.json").read_text())
    assert summary["weights"] == "raw" and summary["files"][0] == str(weights)


def test_a_family_without_ema_exports_its_weights(ae_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="keeps no EMA weights"):
        run_export(tmp_path, ae_ckpt, "use_ema=true")
    run_dir = run_export(tmp_path, ae_ckpt)
    source = torch.load(ae_ckpt, weights_only=True)["state_dict"]
    tensors = load_file(run_dir / "model.safetensors")
    assert set(tensors) == set(source) and all(torch.equal(tensors[k], source[k]) for k in source)
    original, _ = restore_model(ae_ckpt)
    exported, _ = restore_model(run_dir / "model.safetensors")
    torch.testing.assert_close(draw(exported), draw(original), rtol=0, atol=0)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(exported.reconstruct(x), original.reconstruct(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["dcgan", "ldm"])
def test_gan_and_latent_diffusion_round_trip(family, ae_ckpt, tmp_path):
    """The GAN's EMA generator (generator_ema) is found like diffusion's net_ema; latent diffusion rebuilds its
    first stage from the config stored in the JSON, without the autoencoder's own file."""
    if family == "dcgan":
        overrides = ["model=dcgan", "data=digits", "data.image_size=8", "model.latent_dim=8",
                     "model.generator.base_channels=8", "model.discriminator.base_channels=8"]
        ema, prepare = "generator", None
    else:
        first_stage = tmp_path / "first_stage.ckpt"
        first_stage.write_bytes(ae_ckpt.read_bytes())
        overrides = ["model=ldm", f"model.first_stage_ckpt={first_stage}", "data=digits", "data.image_size=8",
                     "model.net.hidden=16", "model.net.depth=2", "model.sampler.steps=3"]
        ema, prepare = "net", lambda model: model.latent_scale.fill_(0.5)  # as if it had seen a training batch
    ckpt = make_checkpoint(tmp_path / f"{family}.ckpt", overrides, prepare)
    if family == "ldm":
        first_stage.unlink()
    run_dir = run_export(tmp_path, ckpt)
    record = json.loads((run_dir / "model.json").read_text())
    assert record["weights"] == "ema" and record["ema_modules"] == {ema: f"{ema}_ema"}
    original, _ = restore_model(ckpt)
    exported, _ = restore_model(run_dir / "model.safetensors")
    torch.testing.assert_close(draw(exported), draw(original), rtol=0, atol=0)
    assert not torch.equal(draw(exported), draw(original, use_ema=False))
    if family == "ldm":
        from gencli.diffusers_export import check_mappable

        with pytest.raises(ConfigError, match="cannot export latent diffusion"):
            check_mappable(exported)


def test_an_existing_export_is_replaced_only_when_asked(ae_ckpt, tmp_path):
    out = tmp_path / "m.safetensors"
    run_export(tmp_path, ae_ckpt, f"out={out}")
    with pytest.raises(ConfigError, match="already exists.*overwrite=true"):
        run_export(tmp_path, ae_ckpt, f"out={out}")
    run_export(tmp_path, ae_ckpt, f"out={out}", "overwrite=true")
    with pytest.raises(ConfigError, match=r"writes a file named NAME\.safetensors"):
        run_export(tmp_path, ae_ckpt, f"out={tmp_path / 'm.bin'}")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


# ----------------------------------------------------------------------------- refusals of a damaged pair
@pytest.fixture
def pair(ae_ckpt, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "pair" / "m.safetensors"
    run_export(tmp_path, ae_ckpt, f"out={out}")
    return out, out.with_suffix(".json")


def rewrite_json(meta: Path, change) -> None:
    record = json.loads(meta.read_text())
    change(record)
    meta.write_text(json.dumps(record))


def reseal(weights: Path, meta: Path) -> None:
    """Make the JSON's hash match the (changed) weights, as someone crafting a pair would."""
    rewrite_json(meta, lambda r: r.update(sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))


def test_missing_json_or_weights_is_one_paragraph(pair):
    weights, meta = pair
    meta.unlink()
    with pytest.raises(ConfigError, match=r"JSON config .*m\.json is missing.*same folder, same name"):
        restore_model(weights)


def test_corrupt_json_and_foreign_json(pair):
    weights, meta = pair
    meta.write_text("{not json")
    with pytest.raises(ConfigError, match="is not readable JSON"):
        restore_model(weights)
    meta.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a gencli export record"):
        restore_model(weights)


def test_corrupt_safetensors_header(pair):
    weights, meta = pair
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="is not the weights file .* describes"):
        restore_model(weights)
    reseal(weights, meta)
    with pytest.raises(ConfigError, match="is not a readable safetensors file"):
        restore_model(weights)


def test_a_json_that_builds_anything_else_is_refused_before_building(pair, tmp_path):
    weights, meta = pair
    marker = tmp_path / "marker"
    rewrite_json(meta, lambda r: r["gencli"]["config"]["model"]["encoder"].update(
        _target_="os.system", _args_=[f"touch {marker}"]))
    with pytest.raises(ConfigError, match=r"is refused: its config would build model\.encoder\._target_='os\.system'"):
        restore_model(weights)
    rewrite_json(meta, lambda r: r["gencli"]["config"]["model"]["encoder"].update(
        _target_="gencli.nets.conv.ConvEncoder", _args_=[], out_features="${oc.env:HOME}"))
    with pytest.raises(ConfigError, match=r"holds the interpolation '\$\{oc.env:HOME\}'"):
        restore_model(weights)
    assert not marker.exists()


def test_tensors_of_another_shape_or_name_are_refused(pair):
    weights, meta = pair
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4)
    save_file({**tensors, name: torch.zeros(3, 3)}, weights)
    reseal(weights, meta)
    with pytest.raises(ConfigError, match=f"does not fit the model its own config builds.*{name}"):
        restore_model(weights)
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    reseal(weights, meta)
    with pytest.raises(ConfigError, match="does not match the model its own config builds"):
        restore_model(weights)


def test_an_export_cannot_be_resumed_from(pair):
    weights, _ = pair
    with pytest.raises(ConfigError, match="holds no optimiser.*Resume from the .ckpt"):
        load_checkpoint(weights, key="resume")


# ----------------------------------------------------------------------------- diffusers
def test_diffusers_folder_matches_gencli_unet_and_ddpm_sampler(ddpm_ckpt, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "pipe"
    run_export(tmp_path, ddpm_ckpt, "format=diffusers", f"out={folder}")
    assert {p.name for p in folder.iterdir()} == {"unet", "scheduler", "model_index.json", "gencli_export.json"}
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    model, _ = restore_model(ddpm_ckpt)
    net = model.sampling_net()  # the EMA weights, which the export holds by default
    assert net is model.net_ema

    # the UNet: the same outputs at every timestep, including a batch of different ones
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (torch.tensor([0, 7, 18, 29]), torch.tensor([29] * 4)):
            torch.testing.assert_close(pipe.unet(x, t).sample, net(x, t), rtol=0, atol=1e-5)
        assert not torch.allclose(pipe.unet(x, t).sample, model.net(x, t), atol=1e-3)  # not the raw weights

    # the schedule, and DDPM sampling over all T steps from one generator stream: the same images
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, model.schedule.alphas_cumprod.float(), rtol=1e-6, atol=0)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=30, output_type="np")
    ours = model.sample(2, generator=torch.Generator().manual_seed(3), sampler=DDPMSampler(steps=None))
    np.testing.assert_allclose(images.images, ((ours + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_diffusers_refusals(ae_ckpt, tmp_path):
    from gencli.diffusers_export import check_mappable, net_mismatches
    from gencli.nets.unet import UNet

    with pytest.raises(ConfigError, match="exports pixel-space diffusion models.*Autoencoder"):
        run_export(tmp_path, ae_ckpt, "format=diffusers")
    assert not (tmp_path / "export_run" / "diffusers").exists()
    conditional = compose_config("train", [*DDPM, "model.conditional=true", "model.num_classes=10"], tmp_path / "c")
    with pytest.raises(ConfigError, match="class-conditional.*DDPMPipeline passes no class labels"):
        check_mappable(instantiate(conditional.model))
    assert net_mismatches(UNet(1, 8, ch=8, ch_mult=(1, 2), attn_resolutions=(), norm_groups=4)) == []
    # groups that gencli narrows where they do not divide a width (8 channels: 8 groups, 16: 16)
    assert "GroupNorms do not all have the same number of groups" in " ".join(
        net_mismatches(UNet(1, 8, ch=8, ch_mult=(1, 2), attn_resolutions=(), norm_groups=16)))
    assert "ch_mult must start with 1" in " ".join(
        net_mismatches(UNet(1, 8, ch=8, ch_mult=(2, 2), attn_resolutions=(), norm_groups=4)))


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_export_then_sample_and_eval_the_pair(ddpm_ckpt, ae_ckpt, tmp_path):
    def run(*args):
        result = gencli(*args, cwd=tmp_path)
        assert result.returncode == 0, describe(result)
        return result

    bad = gencli("export", f"ckpt={ddpm_ckpt}", "format=onnx", cwd=tmp_path)
    assert bad.returncode == 2 and "format=onnx" in bad.stderr and "safetensors" in bad.stderr, describe(bad)

    run("export", f"ckpt={ddpm_ckpt}", f"hydra.run.dir={tmp_path / 'x'}")
    exported = tmp_path / "x" / "model.safetensors"
    for name, ckpt in (("from_ckpt", ddpm_ckpt), ("from_export", exported)):
        run("sample", f"ckpt={ckpt}", "n=4", "batch_size=2", "device=cpu", f"hydra.run.dir={tmp_path / name}")
    a, b = (np.load(tmp_path / name / "samples.npz")["images"] for name in ("from_ckpt", "from_export"))
    assert a.shape == (4, 8, 8, 1) and np.array_equal(a, b)
    refused = gencli("sample", f"ckpt={exported}", "use_ema=false", cwd=tmp_path)
    assert refused.returncode == 2 and "holds only the EMA weights" in refused.stderr, describe(refused)

    run("export", f"ckpt={ae_ckpt}", f"hydra.run.dir={tmp_path / 'y'}")
    for name, ckpt in (("eval_ckpt", ae_ckpt), ("eval_export", tmp_path / "y" / "model.safetensors")):
        run("eval", f"ckpt={ckpt}", "metric=recon", "n=64", "device=cpu", f"hydra.run.dir={tmp_path / name}")
    first, second = (json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
                     for name in ("eval_ckpt", "eval_export"))
    assert first and first == second
