"""Real diffusion chains through the CLI: train -> sample (ddpm, ddim, interpolate) -> eval, and latent
diffusion on a tiny autoencoder checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN, describe, gencli

pytestmark = pytest.mark.slow

# A 8x8 UNet small enough for a CPU test (two levels, 8 channels), a short DDIM default sampler.
TINY = ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.norm_groups=4", "model.net.ch_mult=[1,2]",
        "model.net.attn_resolutions=[4]", "data.image_size=8", "model.sampler.steps=5", "model.ema_decay=0.99",
        "model.scheduler.warmup_steps=10", "model.optimizer.lr=0.002"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion_chain")
    run_dir = root / "train_run"
    result = gencli("train", *TINY, *FAST_TRAIN, f"hydra.run.dir={run_dir}", cwd=root)
    assert result.returncode == 0, describe(result)
    return root, run_dir


def run(root, verb, name, *args):
    out = root / name
    return out, gencli(verb, *args, f"hydra.run.dir={out}", cwd=root)


def test_train_writes_checkpoint_metrics_and_grid(trained):
    _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train/loss", "val/loss", "val/loss_raw", "val/loss_t0", "val/loss_t3"):
        assert np.isfinite(metrics["metrics"][key]), key
    assert metrics["metrics"]["val/loss"] < 1.0  # below the loss of predicting eps = 0
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(last["state_dict"]["ema_updates"]) == metrics["steps"] > 0
    assert any(k.startswith("net_ema.") for k in last["state_dict"])
    assert (run_dir / "samples" / "final.png").is_file()


@pytest.mark.parametrize("sampler", [["sampler=ddpm"], ["sampler=ddim", "sampler.steps=4", "sampler.eta=0.5"], []])
def test_sample_with_each_sampler(trained, sampler):
    root, run_dir = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    name = "sample_" + ("_".join(s.replace("=", "-") for s in sampler) or "default")
    n = "n=4" if sampler and sampler[0] == "sampler=ddpm" else "n=6"  # DDPM: 1000 steps, one batch
    out, result = run(root, "sample", name, f"ckpt={last}", n, "batch_size=4", *sampler)
    assert result.returncode == 0, describe(result)
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (int(n[2:]), 8, 8, 1) and images.dtype == np.uint8
    info = json.loads((out / "sample.json").read_text())["sampling"]
    expected = {"ddpm": ("ddpm", 1000), "ddim": ("ddim", 4)}.get(sampler[0].split("=")[1] if sampler else "", ("ddim", 5))
    assert (info["sampler"]["name"], info["sampler"]["steps"]) == expected
    assert info["weights"] == "ema"
    if sampler != ["sampler=ddpm"]:  # the same seed gives the same images (DDPM-1000 is too slow to run twice)
        again, result = run(root, "sample", name + "_again", f"ckpt={last}", n, "batch_size=4", *sampler)
        np.testing.assert_array_equal(images, np.load(again / "samples.npz")["images"])


def test_interpolate_and_clear_errors(trained):
    root, run_dir = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    out, result = run(root, "sample", "interp", f"ckpt={last}", "mode=interpolate", "n=2", "interpolation_steps=5")
    assert result.returncode == 0, describe(result)
    assert (out / "interpolation.png").is_file()
    _, result = run(root, "sample", "interp_ddpm", f"ckpt={last}", "mode=interpolate", "sampler=ddpm")
    assert result.returncode == 2 and "deterministic sampler" in result.stderr and "Traceback" not in result.stderr
    _, result = run(root, "sample", "steps_alone", f"ckpt={last}", "sampler.steps=3")
    assert result.returncode == 2 and "add sampler=<option>" in result.stderr
    _, result = run(root, "sample", "too_many", f"ckpt={last}", "sampler=ddim", "sampler.steps=5000")
    assert result.returncode == 2 and "sampler.steps=5000" in result.stderr
    _, result = run(root, "sample", "psi", f"ckpt={last}", "truncation=0.5")
    assert result.returncode == 2 and "truncation" in result.stderr


def test_inpaint_variation_and_an_nfe_table(trained):
    root, run_dir = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    out, result = run(root, "sample", "inpaint", f"ckpt={last}", "mode=inpaint", "n=5", "batch_size=2",
                      "sampler=ddpm", "sampler.steps=6", "inpaint.jump_length=2", "inpaint.jump_n_sample=2")
    assert result.returncode == 0, describe(result)
    edited = np.load(out / "inpainted.npz")
    assert edited["images"].shape == (5, 8, 8, 1)
    known = edited["masks"] == 0
    np.testing.assert_array_equal(edited["images"][known], edited["inputs"][known])
    info = json.loads((out / "sample.json").read_text())["sampling"]
    assert (info["method"], info["jump_n_sample"], info["nfe"]) == ("repaint", 2, 6 + 2 * 1 * 2)

    out, result = run(root, "sample", "variation", f"ckpt={last}", "mode=variation", "strength=0.5", "n=3",
                      "sampler=dpmpp_2m", "sampler.steps=4", "sampler.sigmas=karras")
    assert result.returncode == 0, describe(result)
    info = json.loads((out / "sample.json").read_text())["sampling"]
    assert (info["start_step"], info["nfe"]) == (2, 2) and (out / "variations.png").is_file()
    evaluated, result = run(root, "eval", "variation_eval", f"ckpt={last}", f"samples={out / 'variations.npz'}",
                            "metric=fid", "n=3")  # variations.npz is a samples file like any other
    assert result.returncode == 0, describe(result)
    report = json.loads((evaluated / "metrics.json").read_text())
    assert np.isfinite(report["metrics"]["fid_domain"]) and report["provenance"]["fid"]["generated"]["n_generated"] == 3

    _, result = run(root, "sample", "repaint_heun", f"ckpt={last}", "mode=inpaint", "sampler=heun")
    assert result.returncode == 2 and "inpaint.method=replace" in result.stderr and "Traceback" not in result.stderr

    sweep = root / "nfe_sweep"
    result = gencli("eval", "-m", f"ckpt={last}", "metric=[fid,inpaint]", "n=8", "metric.inpaint.method=replace",
                    "sampler=ddim,heun", "sampler.steps=2", f"hydra.sweep.dir={sweep}", cwd=root)
    assert result.returncode == 0, describe(result)
    assert "eval sweep: 2 job(s)" in result.stdout
    import csv

    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [(r["overrides"], r["nfe"]) for r in rows] == [("sampler=ddim", "2"), ("sampler=heun", "3")]
    assert all(float(r["fid_domain"]) >= 0 and float(r["sample_s_per_image"]) > 0 and float(r["inpaint_psnr"]) > 0
               for r in rows)


def test_latent_diffusion_end_to_end(tmp_path):
    ae_dir, ldm_dir = tmp_path / "ae", tmp_path / "ldm"
    result = gencli("train", "model=ae", "model.latent_dim=8", "data.image_size=8", *FAST_TRAIN,
                    f"hydra.run.dir={ae_dir}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    ae_ckpt = ae_dir / "checkpoints" / "last.ckpt"
    result = gencli("train", "model=ldm", f"model.first_stage_ckpt={ae_ckpt}", "data.image_size=8",
                    "model.net.hidden=64", "model.net.depth=2", "model.sampler.steps=10", *FAST_TRAIN,
                    f"hydra.run.dir={ldm_dir}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    metrics = json.loads((ldm_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["metrics"]["val/loss"])
    ae_ckpt.rename(tmp_path / "moved.ckpt")  # the latent-diffusion checkpoint must stand alone
    out = tmp_path / "ldm_samples"
    result = gencli("sample", f"ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'}", "n=5", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert np.load(out / "samples.npz")["images"].shape == (5, 8, 8, 1)
    info = json.loads((out / "sample.json").read_text())["sampling"]
    assert info["family"] == "LatentDiffusion" and info["latent_shape"] == [8] and info["latent_scale"] > 0
    out = tmp_path / "ldm_interp"
    result = gencli("sample", f"ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'}", "mode=interpolate", "n=2",
                    f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    out = tmp_path / "ldm_heun"  # Karras sigmas: the latent denoiser sees fractional timesteps
    result = gencli("sample", f"ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'}", "n=3", "sampler=heun",
                    "sampler.steps=3", "sampler.sigmas=karras", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert json.loads((out / "sample.json").read_text())["sampling"]["nfe"] == 5
    # editing through the latent: known pixels imposed on decoded x0 estimates, pasted back at the end
    out = tmp_path / "ldm_inpaint"
    result = gencli("sample", f"ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'}", "mode=inpaint", "n=3",
                    "inpaint.jump_length=2", "inpaint.jump_n_sample=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    edited = np.load(out / "inpainted.npz")
    np.testing.assert_array_equal(edited["images"][edited["masks"] == 0], edited["inputs"][edited["masks"] == 0])
    assert "re-encoded" in json.loads((out / "sample.json").read_text())["sampling"]["latent"]
    out = tmp_path / "ldm_eval"
    result = gencli("eval", f"ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'}", "metric=ppl", "n=8",
                    f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["ppl_domain"] > 0 and report["provenance"]["ppl"]["decoder"]["sampler"]["name"] == "ddim"
    # class-conditional latent diffusion on the same (unconditional) first stage, sampled with guidance
    cond_dir = tmp_path / "cldm"
    result = gencli("train", "model=ldm", f"model.first_stage_ckpt={tmp_path / 'moved.ckpt'}", "data.image_size=8",
                    "model.net.hidden=64", "model.net.depth=2", "model.sampler.steps=4", "model.conditional=true",
                    "trainer.max_steps=20", "callbacks=minimal", f"hydra.run.dir={cond_dir}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    out = tmp_path / "cldm_samples"
    result = gencli("sample", f"ckpt={cond_dir / 'checkpoints' / 'last.ckpt'}", "labels=[1,2]", "n=4", "guidance=3",
                    f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert np.load(out / "samples.npz")["labels"].tolist() == [1, 2, 1, 2]
    info = json.loads((out / "sample.json").read_text())["sampling"]
    assert info["family"] == "LatentDiffusion" and info["guidance"] == 3.0 and info["nfe"] == 8
