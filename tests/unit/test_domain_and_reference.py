"""The domain feature extractor and the reference-statistics cache, on the embedded digits.

One domain classifier is trained per session (a couple of seconds on the 1,617 training digits)
in the session's cache folder; MNIST accuracy is checked on the real test files when present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gencli.data import DigitsDataModule, MNISTDataModule
from gencli.metrics.features import DomainFeatures
from gencli.metrics.reference import load_or_compute
from gencli.metrics.sample_metrics import FIDMetric, run_sample_metrics
from gencli.metrics.sources import ImageSource, quantise

CPU = torch.device("cpu")


class CountingDigits(DigitsDataModule):
    """Digits that count how often their files are read."""

    reads = 0

    def load_images(self):
        type(self).reads += 1
        return super().load_images()


class TensorSource(ImageSource):
    def __init__(self, images: torch.Tensor):
        self.images, self.n = images, len(images)

    def stream(self, batch_size):
        for start in range(0, self.n, batch_size):
            yield quantise(self.images[start : start + batch_size])

    def describe(self):
        return {"source": "tensor", "n_generated": self.n}


class RetransformedFeatures:
    """The same network, announced with another input transform (as a changed resize would be)."""

    def __init__(self, inner):
        self.inner, self.name, self.feature_dim = inner, inner.name, inner.feature_dim

    def extract(self, images):
        return self.inner.extract(images)

    def features(self, images):
        return self.inner.features(images)

    def identity(self):
        return {**self.inner.identity(), "transform": {"input": "resized to 20x20 then back"}}


@pytest.fixture(scope="module")
def digits_domain(tmp_path_factory):
    cache = tmp_path_factory.mktemp("domain_cache")
    datamodule = DigitsDataModule(seed=0)
    features = DomainFeatures(cache_dir=str(cache))
    features.prepare(datamodule, CPU)
    return features, datamodule, cache


def test_domain_classifier_trains_once_and_is_cached(digits_domain):
    features, datamodule, cache = digits_domain
    assert features.info["cache"] == "trained now"
    assert features.info["held_out_accuracy"] > 0.9  # digits are easy; chance is 0.1
    again = DomainFeatures(cache_dir=str(cache))
    again.prepare(DigitsDataModule(seed=0), CPU)
    assert again.info["cache"] == "hit"
    assert again.info["weights_sha256"] == features.info["weights_sha256"]
    x = datamodule.split("val").images[:16].float() / 127.5 - 1
    torch.testing.assert_close(again.features(x), features.features(x), rtol=0, atol=0)
    f, logits = features.extract(x)
    assert f.shape == (16, features.feature_dim) and logits.shape == (16, 10)
    described = features.describe()
    assert described["comparable_with_papers"] is False and "NOT comparable" in described["warning"]
    # keyed by data set, split, image size and seed
    entry = features.cache.entry(datamodule)
    assert DomainFeatures(cache_dir=str(cache), seed=1).cache.entry(datamodule) != entry
    assert features.cache.entry(DigitsDataModule(seed=1)) != entry
    assert features.cache.entry(DigitsDataModule(seed=0, image_size=8)) != entry
    assert features.cache.entry(DigitsDataModule(seed=0, max_images=500)) != entry  # trained on other images
    assert features.cache.entry(DigitsDataModule(seed=0, random_flip=True)) != entry  # trained with flips
    assert DomainFeatures(cache_dir=str(cache), train_split="val").cache.entry(datamodule) != entry


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1, 1)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digits_domain):
    features, datamodule, _ = digits_domain
    ref = load_or_compute(datamodule, "val", features, None, cache_dir=None, use_cache=False)
    real = datamodule.split("val").images.float() / 127.5 - 1
    fids = []
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        metric = FIDMetric()
        out = run_sample_metrics([metric], TensorSource(noisy(real, sigma)), features, ref, batch_size=64, seed=0)
        fids.append(out["values"][id(metric)]["fid_domain"])
    assert abs(fids[0]) < 1e-6, fids
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_reference_cache_hit_skips_the_data_pass_and_changes_miss(digits_domain, tmp_path):
    features, _, _ = digits_domain
    CountingDigits.reads = 0
    first = load_or_compute(CountingDigits(seed=0), "val", features, None, cache_dir=tmp_path)
    assert first.cache == "miss" and CountingDigits.reads == 1
    hit = load_or_compute(CountingDigits(seed=0), "val", features, None, cache_dir=tmp_path)
    assert hit.cache == "hit" and CountingDigits.reads == 1  # a fresh data module, never set up
    assert hit.n == first.n == 180
    np.testing.assert_array_equal(hit.feature_sum, first.feature_sum)
    np.testing.assert_array_equal(hit.outer_sum, first.outer_sum)
    torch.testing.assert_close(hit.features, first.features, rtol=0, atol=0)
    # what FID needs matches the bank it came from
    bank = first.features.double().numpy()
    np.testing.assert_allclose(first.cov, np.cov(bank, rowvar=False), rtol=1e-9, atol=1e-9)

    for changed in (
        dict(extractor=RetransformedFeatures(features)),  # another input transform
        dict(n=100),  # another n
        dict(split="train"),  # another split
        dict(datamodule=CountingDigits(seed=0, val_fraction=0.2)),  # another data set split
        dict(datamodule=CountingDigits(seed=0, max_images=1500)),  # a subset: other images in both splits
    ):
        args = {"datamodule": CountingDigits(seed=0), "split": "val", "extractor": features, "n": None, **changed}
        reads = CountingDigits.reads
        miss = load_or_compute(args["datamodule"], args["split"], args["extractor"], args["n"], cache_dir=tmp_path)
        assert miss.cache == "miss" and CountingDigits.reads == reads + 1, changed
    assert load_or_compute(CountingDigits(seed=0), "val", features, 100, cache_dir=tmp_path).n == 100


@pytest.mark.slow
def test_domain_classifier_reaches_97_percent_on_real_mnist(shared_mnist, tmp_path):
    """The default recipe on gencli's split of the real 10k MNIST test files: train 9,000, held out 1,000."""
    datamodule = MNISTDataModule(root=str(shared_mnist), source_split="test", seed=0)
    features = DomainFeatures(cache_dir=str(tmp_path))
    features.prepare(datamodule, CPU)
    assert features.info["held_out"]["n"] == 1000 and features.info["trained_on"]["n"] == 9000
    assert features.info["held_out_accuracy"] >= 0.97, features.info


def test_the_classifier_trains_inside_inference_mode_without_touching_the_callers_rng(tmp_path):
    """What the SampleQuality callback does on first use: train inside Lightning's validation loop."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode():
        features = DomainFeatures(cache_dir=str(tmp_path), epochs=1, min_accuracy=0.0)  # 1 epoch: a weak one
        features.prepare(DigitsDataModule(seed=0, max_images=300), CPU)
    assert features.info["cache"] == "trained now"
    torch.testing.assert_close(torch.rand(3), expected)  # fork_rng: the training run's RNG is untouched
