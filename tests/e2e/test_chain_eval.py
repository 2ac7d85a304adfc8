"""gencli eval through the real CLI: ckpt -> eval and samples=DIR|npz chains, provenance, determinism,
the reference cache, in-training sample quality, the classifier as a feature extractor, clear errors.

Every run caches in the session's GENCLI_CACHE (tests/conftest.py), so the digits domain classifier
is trained once for the whole file.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_TRAIN, describe, gencli

SAMPLE_METRICS = ("fid_domain", "kid_domain", "kid_domain_std", "is_domain", "is_domain_std", "precision_domain",
                  "recall_domain", "density_domain", "coverage_domain")


def assert_clear_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, describe(result)
    assert "Traceback" not in result.stderr and "gencli error:" in result.stderr, describe(result)
    for needle in needles:
        assert needle in result.stderr, describe(result)


def run_eval(root, name, *args):
    out = root / name
    result = gencli("eval", *args, f"hydra.run.dir={out}", cwd=root)
    assert result.returncode == 0, describe(result)
    return json.loads((out / "metrics.json").read_text()), result


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_chain")
    run_dir = root / "train_run"
    result = gencli("train", "model=vae", *FAST_TRAIN, f"hydra.run.dir={run_dir}", cwd=root)
    assert result.returncode == 0, describe(result)
    return root, run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ckpt_eval(vae_run):
    """gencli eval ckpt=... metric=all on 200 samples in batches of 50 (the first use of the classifier)."""
    root, ckpt = vae_run
    report, result = run_eval(root, "eval_all", f"ckpt={ckpt}", "metric=all", "n=200", "batch_size=50")
    return report, result


@pytest.mark.slow
def test_ckpt_eval_all_has_every_number_with_its_provenance_and_is_deterministic(vae_run, ckpt_eval):
    root, ckpt = vae_run
    report, result = ckpt_eval
    metrics = report["metrics"]
    for key in (*SAMPLE_METRICS, "recon_mse", "psnr", "ssim", "elbo", "bpd"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid_domain"] > 0 and 0 <= metrics["precision_domain"] <= 1 and 1 <= metrics["is_domain"] <= 10
    assert 0 < metrics["ssim"] <= 1
    prov = report["provenance"]
    for name in ("fid", "kid", "is", "prdc"):
        features, reference, generated = prov[name]["features"], prov[name]["reference"], prov[name]["generated"]
        assert features["name"] == "domain" and features["comparable_with_papers"] is False
        assert len(features["weights_sha256"]) == 64 and features["transform"]["input"]
        assert features["held_out_accuracy"] > 0.9 and features["trained_on"]["split"] == "train"
        assert reference["split"] == "val" and reference["n_real"] == 180
        assert generated["n_generated"] == 200 and generated["seed"] == 0 and generated["ckpt"] == str(ckpt)
        assert generated["sampling"]["family"] == "VAE"
        assert prov[name]["seed"] == 0
    assert prov["kid"]["metric"]["subset_size"] == 180  # clipped to the real images
    run = prov["run"]
    assert run["weights"] == "raw" and run["sampling"]["family"] == "VAE"
    for key in ("gencli", "torch", "torchmetrics", "lightning"):
        assert run[key], key
    assert "NOT comparable" in result.stdout and "fid_domain" in result.stdout

    again, _ = run_eval(root, "eval_all_again", f"ckpt={ckpt}", "metric=all", "n=200", "batch_size=50")
    assert again["metrics"] == metrics  # same command, same numbers
    assert again["provenance"]["fid"]["reference"]["cache"] == "hit"
    assert again["provenance"]["fid"]["features"]["cache"] == "hit"


@pytest.mark.slow
def test_samples_npz_and_dir_chains_match_the_ckpt_chain(vae_run, ckpt_eval):
    root, ckpt = vae_run
    from_ckpt = {k: v for k, v in ckpt_eval[0]["metrics"].items() if k in SAMPLE_METRICS}
    sample_dir = root / "sample_run"
    result = gencli("sample", f"ckpt={ckpt}", "n=200", "batch_size=50", f"hydra.run.dir={sample_dir}", cwd=root)
    assert result.returncode == 0, describe(result)
    npz = sample_dir / "samples.npz"
    # the same images, however they arrive, in the same batches (float32 kernels may round differently for
    # other batch shapes), give the same numbers
    from_npz, _ = run_eval(root, "eval_npz", f"samples={npz}", "data=digits", "metric=all", "n=0", "batch_size=50")
    assert from_npz["metrics"] == from_ckpt
    assert from_npz["provenance"]["fid"]["generated"]["source"] == "samples"
    assert "samples=" in from_npz["provenance"]["recon"]["skipped"]  # recon needs the inputs: skipped, with why
    pngs = root / "pngs"
    pngs.mkdir()
    for i, image in enumerate(np.load(npz)["images"]):
        Image.fromarray(image[..., 0]).save(pngs / f"{i:04d}.png")
    # with ckpt= beside samples=, the checkpoint names the data set and the files are what is scored
    from_dir, _ = run_eval(root, "eval_dir", f"samples={pngs}", f"ckpt={ckpt}", "metric=[fid,kid,is,prdc]", "n=0",
                           "batch_size=50", "save_samples=true")
    assert from_dir["metrics"] == from_ckpt
    assert from_dir["provenance"]["run"]["sampling"] is None and from_dir["provenance"]["run"]["weights"] is None
    saved = np.load(root / "eval_dir" / "samples.npz")["images"]
    np.testing.assert_array_equal(saved, np.load(npz)["images"])


@pytest.mark.slow
def test_a_reference_cache_hit_never_reads_the_data(mnist_root, tmp_path):
    data = tmp_path / "mnist_copy"
    shutil.copytree(mnist_root, data)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1), dtype=np.uint8))
    # 86 toy training images make a weak classifier: accept it (the accuracy floor: tests/unit/test_eval_two_sets.py)
    args = (f"samples={samples}", "data=mnist", f"data.root={data}", "metric=fid", "n=0", "features.min_accuracy=0")
    first, _ = run_eval(tmp_path, "first", *args)
    assert first["provenance"]["fid"]["reference"]["cache"] == "miss"
    shutil.rmtree(data)  # the data set is gone: only a cache hit can succeed
    second, _ = run_eval(tmp_path, "second", *args)
    assert second["provenance"]["fid"]["reference"]["cache"] == "hit"
    assert second["provenance"]["fid"]["features"]["cache"] == "hit"
    assert second["metrics"] == first["metrics"]  # (what misses is tested in tests/unit/test_domain_and_reference.py)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae", "gan"])
def test_sample_quality_during_training_is_the_monitor_and_the_optimized_metric(tmp_path, model):
    family = (["model=vae"] if model == "vae" else
              ["model=dcgan", "model.latent_dim=16", "model.generator.base_channels=8",
               "model.discriminator.base_channels=8"])
    run_dir = tmp_path / "train_run"
    result = gencli("train", *family, *FAST_TRAIN, "callbacks.sample_quality.every_n_epochs=1",
                    "callbacks.sample_quality.n=100", "model.monitor=val/fid_domain", "model.monitor_mode=min",
                    "callbacks.sample_quality.features.min_accuracy=0",  # a toy classifier of a few epochs' data
                    f"hydra.run.dir={run_dir}", cwd=tmp_path,
                    env={"GENCLI_CACHE": str(tmp_path / "cache")})  # first use: the classifier trains mid-run
    assert result.returncode == 0, describe(result)
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["optimized_metric"] == "val/fid_domain"
    assert np.isfinite(report["metrics"]["val/fid_domain"]) and np.isfinite(report["metrics"]["val/kid_domain"])
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/fid_domain" in header


@pytest.mark.slow
def test_a_trained_classifier_serves_as_the_domain_extractor(tmp_path, vae_run):
    run_dir = tmp_path / "classifier_run"
    result = gencli("train", "model=classifier", "trainer.max_epochs=2", "callbacks=minimal",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    train_report = json.loads((run_dir / "metrics.json").read_text())
    assert train_report["optimized_metric"] == "val/acc" and train_report["metrics"]["val/acc"] > 0.5
    assert not (run_dir / "samples").exists()  # nothing to sample
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _, vae_ckpt = vae_run
    report, _ = run_eval(tmp_path, "eval", f"ckpt={vae_ckpt}", "metric=fid", "n=100", f"features.ckpt={ckpt}")
    features = report["provenance"]["fid"]["features"]
    assert features["source"] == "features.ckpt" and features["ckpt"] == str(ckpt)
    assert features["held_out_accuracy"] == pytest.approx(train_report["metrics"]["val/acc"])
    result = gencli("eval", f"ckpt={ckpt}", "metric=fid", cwd=tmp_path)
    assert_clear_error(result, 2, "holds a Classifier, not a generative model", "features.ckpt=")


def test_offline_inception_through_the_cli(tmp_path):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((4, 16, 16, 1), dtype=np.uint8))
    result = gencli("eval", f"samples={samples}", "data=digits", "metric=fid", "features=inception", cwd=tmp_path,
                    env={"TORCH_HOME": str(tmp_path / "torch"), "GENCLI_OFFLINE": "1"})
    assert_clear_error(result, 1, "weights-inception-2015-12-05-6726825d.pth",
                       str(tmp_path / "torch" / "hub" / "checkpoints"), "features.weights_path=",
                       "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/")


def test_sample_metric_usage_errors(tmp_path, compose_cfg):
    from gencli.errors import ConfigError
    from gencli.jobs.evaluate import evaluate

    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((4, 28, 28, 1), dtype=np.uint8))
    assert_clear_error(gencli("eval", f"samples={samples}", "data=digits", "metric=fid", cwd=tmp_path), 2,
                       "28x28 images but data=digits", "data.image_size=28")
    with pytest.raises(ConfigError, match="needs real images.*data="):
        evaluate(compose_cfg("eval", [f"samples={samples}", "metric=fid"]))
    with pytest.raises(ConfigError, match=r"needs ckpt=PATH .* or samples=DIR\|file.npz"):
        evaluate(compose_cfg("eval", ["metric=fid", "data=digits"]))


@pytest.mark.slow
def test_diffusion_eval_records_the_sampler_its_steps_eta_and_ema(tmp_path):
    """The sampler chosen at eval time reaches model.sample and the provenance (a tiny 8x8 DDPM)."""
    tiny = ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.norm_groups=4", "model.net.ch_mult=[1,2]",
            "model.net.attn_resolutions=[4]", "data.image_size=8", "model.sampler.steps=5", "model.ema_decay=0.99",
            "model.scheduler.warmup_steps=10"]
    run_dir = tmp_path / "train_run"
    result = gencli("train", *tiny, *FAST_TRAIN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    report, _ = run_eval(tmp_path, "eval_ddim", f"ckpt={ckpt}", "metric=[fid,kid]", "n=40", "sampler=ddim",
                         "sampler.steps=3", "sampler.eta=0.5")
    sampling = report["provenance"]["fid"]["generated"]["sampling"]
    assert sampling["sampler"]["name"] == "ddim" and sampling["sampler"]["steps"] == 3
    assert sampling["sampler"]["eta"] == 0.5 and sampling["weights"] == "ema"
    assert report["provenance"]["run"]["weights"] == "ema" and np.isfinite(report["metrics"]["fid_domain"])
