"""A real GAN train -> sample (grid, interpolate, truncation, raw generator) -> eval chain through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN, describe, gencli

pytestmark = pytest.mark.slow

TINY = ["model=dcgan", "model.latent_dim=16", "model.generator.base_channels=8",
        "model.discriminator.base_channels=8", "callbacks.gan_monitor.every_n_steps=20",
        "callbacks.gan_monitor.warmup_steps=40"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short DCGAN run on the embedded 16x16 digits (2 epochs, 100 batches, 200 optimiser steps)."""
    root = tmp_path_factory.mktemp("gan_chain")
    run_dir = root / "train_run"
    result = gencli("train", *TINY, *FAST_TRAIN, f"hydra.run.dir={run_dir}", cwd=root)
    assert result.returncode == 0, describe(result)
    return root, run_dir, result


def sample(root, name, *args):
    out = root / name
    result = gencli("sample", *args, f"hydra.run.dir={out}", cwd=root)
    return out, result


def spread(images: np.ndarray) -> float:
    flat = images.reshape(len(images), -1).astype(np.float64)
    return float(np.mean([np.linalg.norm(a - b) for i, a in enumerate(flat) for b in flat[i + 1 :]]))


def test_train_writes_checkpoints_losses_and_diversity(trained):
    _, run_dir, _ = trained
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1  # monitored train/diversity_gap
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 200
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 200  # the latest step, whichever step was best
    assert int(last["state_dict"]["g_steps"]) == 100 and int(last["state_dict"]["d_steps"]) == 100
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "train/diversity"):
        assert np.isfinite(metrics["metrics"][key]), key
    assert 0 < metrics["metrics"]["train/diversity"] < 3
    assert (run_dir / "samples" / "final.png").is_file()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/d_real" in header and "train/diversity" in header


def test_sample_grid_seeded_and_raw_generator(trained):
    root, run_dir, _ = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    out, result = sample(root, "grid", f"ckpt={last}", "n=12", "batch_size=5")
    assert result.returncode == 0, describe(result)
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
    assert (out / "samples.png").is_file()
    info = json.loads((out / "sample.json").read_text())["sampling"]
    assert info["weights"] == "ema" and info["truncation"] is None

    again, result = sample(root, "grid_again", f"ckpt={last}", "n=12", "batch_size=4")
    assert result.returncode == 0, describe(result)
    np.testing.assert_array_equal(images, np.load(again / "samples.npz")["images"])  # same seed, same images

    raw, result = sample(root, "raw", f"ckpt={last}", "n=12", "use_ema=false")
    assert result.returncode == 0, describe(result)
    assert not np.array_equal(images, np.load(raw / "samples.npz")["images"])
    assert json.loads((raw / "sample.json").read_text())["sampling"]["weights"] == "raw"


def test_truncation_and_interpolation(trained):
    root, run_dir, _ = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    full, result = sample(root, "full", f"ckpt={last}", "n=12")
    assert result.returncode == 0, describe(result)
    images = np.load(full / "samples.npz")["images"]
    truncated, result = sample(root, "truncated", f"ckpt={last}", "n=12", "truncation=0.05")
    assert result.returncode == 0, describe(result)
    info = json.loads((truncated / "sample.json").read_text())["sampling"]
    assert info["truncation"] == 0.05 and "psi" in info["truncation_method"]
    assert spread(np.load(truncated / "samples.npz")["images"]) < 0.5 * spread(images)  # all near G(0)

    interp, result = sample(root, "interp", f"ckpt={last}", "mode=interpolate", "n=3", "interpolation_steps=6",
                            "truncation=0.7")
    assert result.returncode == 0, describe(result)
    assert (interp / "interpolation.png").is_file()


def test_unsupported_options_and_recon_eval_are_clear_usage_errors(trained):
    root, run_dir, _ = trained
    last = run_dir / "checkpoints" / "last.ckpt"
    for bad, words in (("sampler=ddim", "does not apply to a GAN"), ("truncation=1.5", "truncation=1.5 is not valid: truncation must be"),
                       ("mode=reconstruct", "needs a family with an encoder"),
                       ("mode=inpaint", "only generates from noise")):
        _, result = sample(root, "bad", f"ckpt={last}", bad)
        assert result.returncode == 2, describe(result)
        assert words in result.stderr and "Traceback" not in result.stderr
    result = gencli("eval", f"ckpt={last}", "metric=recon", "n=20", f"hydra.run.dir={root / 'eval'}", cwd=root)
    assert result.returncode == 2, describe(result)
    assert "needs a family with an encoder" in result.stderr and "holds a GAN" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_diverging_run_stops_with_exit_1_and_a_plain_message(tmp_path):
    """Learning rates of 1e30: D's first step sends its scores to inf, so G's first loss is NaN."""
    run_dir = tmp_path / "nan_run"
    result = gencli("train", *TINY, *FAST_TRAIN, "model.d_optimizer.lr=1e30", "model.g_optimizer.lr=1e30",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 1, describe(result)
    error = result.stderr[result.stderr.index("gencli error:"):].strip()
    assert "\n" not in error and "Traceback" not in result.stderr  # one paragraph
    assert error.startswith("gencli error: training stopped at step 1 (epoch 0, batch 0): the generator loss is NaN.")
    assert "Likely cause: the GAN diverged" in error and "model.d_optimizer.lr" in error
    # Nothing finite was left to save (D's batch-norm statistics are already inf), and nothing was written.
    assert "nothing good to keep" in error
    assert not list(run_dir.glob("checkpoints/*.ckpt"))
