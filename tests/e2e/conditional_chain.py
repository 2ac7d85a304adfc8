"""Class-conditional chains through the CLI, one per family: train with model.conditional=true on the embedded
digits -> sample with labels (and guidance for diffusion) -> eval, which adds class accuracy and intra-FID.

The tests live here and run from one file per family (test_chain_conditional_<family>.py: ``from
conditional_chain import *`` with that family's ``trained`` fixture), so pytest-xdist spreads the three chains
over its workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN, describe, gencli

pytestmark = pytest.mark.slow

FAMILIES = {
    "vae": ["model=vae", "model.latent_dim=8", "model.encoder.base_channels=8", "model.decoder.base_channels=8"],
    "gan": ["model=dcgan", "model.latent_dim=16", "model.generator.base_channels=8",
            "model.discriminator.base_channels=8", "callbacks.gan_monitor.every_n_steps=20",
            "callbacks.gan_monitor.warmup_steps=40"],
    "ddpm": ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.norm_groups=4", "model.net.ch_mult=[1,2]",
             "model.net.attn_resolutions=[4]", "data.image_size=8", "model.sampler.steps=4", "model.ema_decay=0.99",
             "model.scheduler.warmup_steps=10", "model.optimizer.lr=0.002", "model.guidance=2"],
}
# a 1-epoch classifier (fast) is a weak one: accept it (the accuracy floor is tested in tests/unit/test_eval_two_sets.py)
EVAL = ["metric=fid", "n=60", "batch_size=30", "features.epochs=1", "features.min_accuracy=0"]


def run(root, verb, name, *args):
    out = root / name
    return out, gencli(verb, *args, f"hydra.run.dir={out}", cwd=root)


def trained_fixture(family: str):
    """The module-scoped fixture ``trained`` of one family: (family, root folder, last.ckpt) of a short run."""

    @pytest.fixture(scope="module")
    def trained(tmp_path_factory):
        root = tmp_path_factory.mktemp(f"conditional_{family}")
        run_dir, result = run(root, "train", "train_run", *FAMILIES[family], "model.conditional=true", *FAST_TRAIN,
                              "trainer.max_steps=40")
        assert result.returncode == 0, describe(result)
        return family, root, run_dir / "checkpoints" / "last.ckpt"

    return trained


def test_checkpoint_records_the_classes(trained):
    _, _, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["gencli"]["conditional"] is True and checkpoint["gencli"]["num_classes"] == 10
    assert checkpoint["gencli"]["class_names"] == [str(i) for i in range(10)]
    assert checkpoint["gencli"]["config"]["model"]["num_classes"] == 10  # the stored config rebuilds the model


def test_sample_with_labels_all_and_a_list(trained):
    family, root, ckpt = trained
    out, result = run(root, "sample", "all", f"ckpt={ckpt}", "labels=all", "nrow=3")
    assert result.returncode == 0, describe(result)
    for k in range(10):
        assert f"row {k}: class {k} ({k})" in result.stdout + result.stderr
    with np.load(out / "samples.npz") as archive:
        assert archive["images"].shape[0] == 30
        assert archive["labels"].tolist() == [k for k in range(10) for _ in range(3)]
    info = json.loads((out / "sample.json").read_text())
    assert info["n"] == 30 and info["sampling"]["conditional"] is True and info["labels"]["labels"] == "all"

    extra = ["guidance=3"] if family == "ddpm" else []
    out, result = run(root, "sample", "list", f"ckpt={ckpt}", "labels=[3,3,7]", "n=6", "batch_size=4", *extra)
    assert result.returncode == 0, describe(result)
    with np.load(out / "samples.npz") as archive:
        assert archive["labels"].tolist() == [3, 3, 7, 3, 3, 7]
        listed = archive["images"]
    # image i depends on (seed, i, its label) alone: the same images in another batching, by class name
    out2, result = run(root, "sample", "names", f"ckpt={ckpt}", "labels=['3','3','7']", "n=6", "batch_size=6", *extra)
    assert result.returncode == 0, describe(result)
    with np.load(out2 / "samples.npz") as archive:
        np.testing.assert_array_equal(archive["images"], listed)
    if family == "ddpm":
        info = json.loads((out / "sample.json").read_text())["sampling"]
        assert info["guidance"] == 3.0 and info["nfe"] == 2 * 4


def test_interpolation_holds_the_class(trained):
    family, root, ckpt = trained
    out, result = run(root, "sample", "interp", f"ckpt={ckpt}", "mode=interpolate", "labels=[5]", "n=2",
                      "interpolation_steps=3")
    assert result.returncode == 0, describe(result)
    assert (out / "interpolation.png").is_file()


def test_eval_adds_class_accuracy_and_intra_fid(trained):
    family, root, ckpt = trained
    extra = ["guidance=2"] if family == "ddpm" else []
    out, result = run(root, "eval", "eval", f"ckpt={ckpt}", *EVAL, *extra)
    assert result.returncode == 0, describe(result)
    assert (out / "eval.log").is_file()  # <verb>.log, as train.log and sample.log
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert 0 <= metrics["class_accuracy_domain"] <= 1
    assert np.isfinite(metrics["intra_fid_domain"]) and np.isfinite(metrics["fid_domain"])
    per_class = report["provenance"]["intra_fid"]["metric"]["per_class"]
    assert len(per_class) == 10
    generated = report["provenance"]["class_accuracy"]["generated"]
    assert "class-balanced" in generated["labels"]["rule"] or generated["labels"]["labels"] == "balanced"
    # class-balanced by default: 6 images of every class
    counts = report["provenance"]["intra_fid"]["metric"]["images_per_class"]
    assert {int(k): v["generated"] for k, v in counts.items()} == {k: 6 for k in range(10)}
    if family == "ddpm":
        assert report["provenance"]["run"]["sampling"]["guidance"] == 2.0

    # the same images written by gencli sample and read back with their labels give the same numbers
    samples, result = run(root, "sample", "for_eval", f"ckpt={ckpt}", "n=60", *extra)
    assert result.returncode == 0, describe(result)
    out2, result = run(root, "eval", "eval_files", f"samples={samples / 'samples.npz'}", f"ckpt={ckpt}", *EVAL)
    assert result.returncode == 0, describe(result)
    again = json.loads((out2 / "metrics.json").read_text())["metrics"]
    for key in ("fid_domain", "class_accuracy_domain", "intra_fid_domain"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-6), key
