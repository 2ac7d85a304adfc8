"""Sample quality measured during a 2-process DDP run equals `gencli eval` in one process on the same samples.

The SampleQuality callback under trainer=ddp_cpu splits its n images between the two ranks (per-image
seeds: image i is the same image on any rank) and combines the metric states with torchmetrics' sync.
`gencli eval` of the checkpoint written at the same epoch end, in one process, with the same n, seed,
reference split, feature extractor (the cached domain classifier) and KID subsets, must give the same
FID and KID up to float rounding (other batch shapes: a few float32 ulps in the features).
"""

from __future__ import annotations

import json

import pytest

from conftest import describe

pytestmark = pytest.mark.slow

QUALITY = {"n": 50, "kid_subset_size": 20, "kid_subsets": 5, "batch_size": 16,
           "features.min_accuracy": 0}  # a classifier of toy data: accept it whatever its accuracy


# DCGAN: measured at the training epoch's end, and a family that needs DDP's unused-parameter search (the VAE's
# path, after validation, is the same pass; tests/unit/test_sample_metrics_ddp.py covers the maths)
@pytest.mark.parametrize("model", ["dcgan"])
def test_in_training_fid_and_kid_under_ddp_equal_single_process_eval(run_gencli, tmp_path, model):
    train = run_gencli("train", f"model={model}", "trainer=ddp_cpu", "data.image_size=8", "data.max_images=300",
                       "trainer.max_epochs=1", "callbacks=minimal", "callbacks.sample_quality.every_n_epochs=1",
                       *(f"callbacks.sample_quality.{k}={v}" for k, v in QUALITY.items()), "seed=3", "run_name=r")
    assert train.returncode == 0, describe(train)
    run = tmp_path / "outputs" / "train" / "runs" / "r"
    logs = (run / "train.log").read_text() + (run / "train_ddp_process_1.log").read_text()
    assert "25 of them on rank 0 of 2" in logs and "25 of them on rank 1 of 2" in logs  # the work was split
    during = json.loads((run / "metrics.json").read_text())["metrics"]

    evaluate = run_gencli("eval", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "metric=[fid,kid]", "n=50", "seed=3",
                          "metric.kid.subset_size=20", "metric.kid.subsets=5", "batch_size=7", "run_name=e",
                          "features.min_accuracy=0")  # the same toy classifier as during training
    assert evaluate.returncode == 0, describe(evaluate)
    after = json.loads((tmp_path / "outputs" / "eval" / "runs" / "e" / "metrics.json").read_text())["metrics"]
    assert during["val/fid_domain"] == pytest.approx(after["fid_domain"], rel=1e-5)
    assert during["val/kid_domain"] == pytest.approx(after["kid_domain"], rel=1e-5, abs=1e-9)
    print(f"FID during DDP training {during['val/fid_domain']!r}, single-process eval {after['fid_domain']!r}; "
          f"KID {during['val/kid_domain']!r} vs {after['kid_domain']!r}")
