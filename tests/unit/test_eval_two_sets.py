"""``gencli eval samples=A ref=B``: metrics between any two image sets (folders or .npz), like torch-fidelity's
--input1/--input2, with the same extractors, cache and provenance; and the domain extractor's accuracy floor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import describe
from gencli.metrics.features import MIN_ACCURACY, default_min_accuracy

DIGITS8 = ["data=digits", "data.image_size=8"]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """a.npz: 300 digits (with labels); b/: 300 other digits as PNG class folders; c.npz: 8x8 noise."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("two_sets")
    digits = load_digits()
    images = (digits.images * 16).clip(0, 255).astype(np.uint8)
    np.savez(root / "a.npz", images=images[:300], labels=digits.target[:300])
    for i in range(300, 600):
        (root / "b" / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / "b" / str(digits.target[i]) / f"{i:04d}.png")
    noise = np.random.default_rng(0).integers(0, 256, (300, 8, 8), dtype=np.uint8)
    np.savez(root / "c.npz", images=noise)
    return root


def metrics_of(result, out) -> dict:
    assert result.returncode == 0, describe(result)
    return json.loads(next(out.glob("outputs/eval/runs/*/metrics.json")).read_text())


def test_any_two_sets_are_compared_with_provenance_and_a_content_keyed_cache(two_sets, run_gencli, tmp_path):
    run = ["eval", f"samples={two_sets / 'a.npz'}", f"ref={two_sets / 'b'}", "metric=[fid,kid,prdc]", "n=0",
           *DIGITS8]
    first = run_gencli(*run, "run_name=first", env={"COLUMNS": "300"})  # no wrapping inside table cells
    report = metrics_of(first, tmp_path)
    # digits against other digits: close; against noise (below): far
    assert 0 <= report["metrics"]["fid_domain"] < 50 and report["metrics"]["recall_domain"] > 0.5
    ref = report["provenance"]["fid"]["reference"]
    assert ref["files"]["path"] == str(two_sets / "b") and len(ref["files"]["sha256"]) == 64
    assert ref["n_real"] == 300 and ref["cache"] == "miss"
    assert report["provenance"]["run"]["ref"] == str(two_sets / "b")
    features = report["provenance"]["fid"]["features"]
    assert features["min_accuracy"]["value"] == MIN_ACCURACY["digits"] and features["held_out_accuracy"] >= MIN_ACCURACY["digits"]
    # the extractor's accuracy is printed beside every number
    rows = [line for line in first.stdout.splitlines() if "_domain" in line]
    assert len(rows) >= 8 and all("held-out accuracy" in row and "from ref=" in row for row in rows)
    # the labelled samples get class accuracy; intra-FID needs the real images' labels, which PNG folders lack
    assert "class_accuracy_domain" in report["metrics"] and "intra_fid skipped: ref=" in first.stdout

    second = run_gencli(*run, "run_name=second")
    assert second.returncode == 0, describe(second)
    hit = json.loads((tmp_path / "outputs/eval/runs/second/metrics.json").read_text())
    assert hit["provenance"]["fid"]["reference"]["cache"] == "hit"
    assert hit["metrics"]["fid_domain"] == pytest.approx(report["metrics"]["fid_domain"], rel=1e-6)

    # one changed pixel in one reference file: a different sha256, so the cache misses (never stale statistics)
    victim = sorted((two_sets / "b").rglob("*.png"))[0]
    pixels = np.array(Image.open(victim))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(victim)
    changed = run_gencli(*run, "run_name=changed")
    assert changed.returncode == 0, describe(changed)
    moved = json.loads((tmp_path / "outputs/eval/runs/changed/metrics.json").read_text())
    assert moved["provenance"]["fid"]["reference"]["cache"] == "miss"
    assert moved["provenance"]["fid"]["reference"]["files"]["sha256"] != ref["files"]["sha256"]

    noise = run_gencli("eval", f"samples={two_sets / 'c.npz'}", f"ref={two_sets / 'b'}", "metric=fid", "n=0",
                       *DIGITS8, "run_name=noise")
    assert noise.returncode == 0, describe(noise)
    far = json.loads((tmp_path / "outputs/eval/runs/noise/metrics.json").read_text())
    assert far["metrics"]["fid_domain"] > 5 * report["metrics"]["fid_domain"]


def test_a_set_against_itself_scores_as_identical(two_sets, compose_cfg):
    from gencli.jobs.evaluate import evaluate

    cfg = compose_cfg("eval", [f"samples={two_sets / 'a.npz'}", f"ref={two_sets / 'a.npz'}", "metric=[fid,prdc]",
                               "n=0", "device=cpu", *DIGITS8])
    report = evaluate(cfg)
    # a Fréchet distance is never negative: rounding just below 0 (-1.8e-11 here) is reported as 0, with a note
    assert 0 <= report["metrics"]["fid_domain"] < 1e-3
    assert all(value >= 0 for value in report["provenance"]["intra_fid"]["metric"]["per_class"].values())
    assert report["metrics"]["precision_domain"] == 1.0 and report["metrics"]["recall_domain"] == 1.0
    # a labelled .npz as ref= has the real images' classes too: intra-FID runs (and is ~0 against itself)
    assert report["metrics"]["intra_fid_domain"] < 1e-3


@pytest.mark.parametrize("overrides, expected", [
    ([], ["samples=", "needs real images to be compared with", "ref=DIR|file.npz", "data=<name>"]),
    (["ref={b}"], ["ref=", "unlabelled images", "data=", "features.ckpt=PATH", "features=inception"]),
    (["ref={c}", "data=digits"], ["holds 8x8 images but data=digits", "data.image_size=8"]),
    (["ref={b}", *DIGITS8, "features.min_accuracy=0.999"],
     ["held-out accuracy is 0.", "below the 0.999 required (features.min_accuracy)", "features.epochs=",
      "features.min_accuracy=<lower>"]),
])
def test_two_set_refusals_are_one_clear_paragraph(two_sets, run_gencli, overrides, expected):
    overrides = [o.format(b=two_sets / "b", c=two_sets / "c.npz") for o in overrides]
    result = run_gencli("eval", f"samples={two_sets / 'a.npz'}", "metric=fid", *overrides)
    # a usage error exits 2; a classifier that turned out too weak is a run-time failure (exit 1)
    assert result.returncode == (1 if "features.min_accuracy=0.999" in overrides else 2), describe(result)
    message = result.stderr.split("gencli error: ", 1)[1]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in message, (text, message)


def test_two_file_sets_of_different_sizes_are_refused_not_resized(two_sets, tmp_path, compose_cfg):
    from gencli.errors import ConfigError
    from gencli.jobs.evaluate import evaluate

    np.savez(tmp_path / "big.npz", images=np.zeros((10, 16, 16), np.uint8))
    cfg = compose_cfg("eval", [f"samples={tmp_path / 'big.npz'}", f"ref={two_sets / 'c.npz'}", "metric=fid",
                               "features=inception", "device=cpu"])
    with pytest.raises(ConfigError, match="holds 16x16 images but ref=.*c.npz holds 8x8 images.*same size"):
        evaluate(cfg)


def test_default_accuracy_floor_per_data_set():
    assert default_min_accuracy("mnist", 10)[0] == 0.95 and default_min_accuracy("cifar10", 10)[0] == 0.6
    assert "data=mnist" in default_min_accuracy("mnist", 10)[1]
    # a folder: half right and at least twice chance, capped at 0.75
    assert default_min_accuracy("folder", 10)[0] == 0.5
    assert default_min_accuracy("folder", 3)[0] == pytest.approx(2 / 3)
    assert default_min_accuracy("folder", 2)[0] == 0.75 and default_min_accuracy(None, 0)[0] == 0.75
