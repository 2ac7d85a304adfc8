"""Real train -> sample -> eval chains for the autoencoder and the VAE, through the gencli CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FAST_TRAIN, describe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_train_sample_eval_chain(run_gencli, tmp_path, model):
    run_dir = tmp_path / "train_run"
    result = run_gencli("train", f"model={model}", *FAST_TRAIN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, describe(result)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    train_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(train_metrics["metrics"]["val/loss"])
    assert (run_dir / "samples" / "final.png").is_file()

    sample_dir = tmp_path / "sample_run"
    result = run_gencli("sample", f"ckpt={last}", "n=10", "batch_size=4", f"hydra.run.dir={sample_dir}")
    assert result.returncode == 0, describe(result)
    images = np.load(sample_dir / "samples.npz")["images"]
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8
    assert images.std() > 0  # not a blank grid

    # Another seed, other images (same seed, same images: tests/unit/test_per_image_seeds.py).
    other = tmp_path / "sample_other"
    assert run_gencli("sample", f"ckpt={last}", "n=10", "seed=1", f"hydra.run.dir={other}").returncode == 0
    assert not np.array_equal(images, np.load(other / "samples.npz")["images"])

    for mode, name in (("interpolate", "interpolation.png"), ("reconstruct", "reconstructions.png")):
        out = tmp_path / f"sample_{mode}"
        result = run_gencli("sample", f"ckpt={last}", f"mode={mode}", "n=4", f"hydra.run.dir={out}")
        assert result.returncode == 0, describe(result)
        assert (out / name).is_file()

    # Editing: the autoencoder baseline fills the left half and keeps the rest; variations move the latent.
    out = tmp_path / "sample_inpaint"
    result = run_gencli("sample", f"ckpt={last}", "mode=inpaint", "mask=left", "n=5", "batch_size=2",
                        f"hydra.run.dir={out}")
    assert result.returncode == 0, describe(result)
    edited = np.load(out / "inpainted.npz")
    assert edited["images"].shape == edited["inputs"].shape == (5, 16, 16, 1)
    known = edited["masks"] == 0  # 255 where filled
    np.testing.assert_array_equal(edited["images"][known], edited["inputs"][known])
    assert (edited["masks"][:, :, :8] == 255).all() and (out / "inpaint.png").is_file()
    info = json.loads((out / "sample.json").read_text())
    assert info["sampling"]["method"] == "autoencoder baseline" and info["mask"]["filled_fraction"] == 0.5
    out = tmp_path / "sample_variation"
    result = run_gencli("sample", f"ckpt={last}", "mode=variation", "strength=0.7", "n=4", f"hydra.run.dir={out}")
    assert result.returncode == 0, describe(result)
    varied = np.load(out / "variations.npz")
    assert varied["images"].shape == (4, 16, 16, 1) and not np.array_equal(varied["images"], varied["inputs"])

    eval_dir = tmp_path / "eval_run"
    result = run_gencli("eval", f"ckpt={last}", "metric=[recon,inpaint,ppl]", "n=50", f"hydra.run.dir={eval_dir}")
    assert result.returncode == 0, describe(result)
    report = json.loads((eval_dir / "metrics.json").read_text())
    assert 0 < report["metrics"]["inpaint_psnr"] < 100 and 0 < report["metrics"]["inpaint_ssim"] <= 1
    assert report["metrics"]["ppl_domain"] > 0 and report["provenance"]["ppl"]["epsilon"] == 1e-4
    assert report["provenance"]["inpaint"]["mask"] == "center" and (eval_dir / "inpaint_examples.png").is_file()
    assert 0 < report["metrics"]["recon_mse"] < 0.25
    assert report["provenance"]["run"]["ckpt"] == str(last)
    assert report["provenance"]["run"]["torch"]
    rows = (eval_dir / "anomaly_scores.csv").read_text().strip().splitlines()
    assert len(rows) == 51 and rows[0].startswith("index,label,anomaly_score")
    if model == "vae":
        assert report["metrics"]["bpd"] > 0 and np.isfinite(report["metrics"]["elbo"])
