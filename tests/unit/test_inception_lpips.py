"""features=inception and LPIPS without real weights: the loading path and the offline errors.

No real weights exist on the test machine (and no network): the loading path is checked with a file of
random weights in the exact format, saved under the expected name in a temporary TORCH_HOME; the
errors are checked with an empty TORCH_HOME and GENCLI_OFFLINE=1 (so an online CI never downloads).
Inception runs at a few images per second on a CPU, so only a handful of tiny images go through it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gencli.data import DigitsDataModule
from gencli.errors import ConfigError, RuntimeFailure
from gencli.metrics.domain import file_sha256
from gencli.metrics.features import INCEPTION_FILE, INCEPTION_URL, InceptionFeatures, hub_checkpoint, online
from gencli.metrics.reconstruction import lpips_metric
from gencli.metrics.reference import load_or_compute
from gencli.metrics.sample_metrics import FIDMetric, ISMetric, KIDMetric, run_sample_metrics
from gencli.metrics.sources import FileSource

CPU = torch.device("cpu")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("GENCLI_OFFLINE", "1")
    return home


@pytest.fixture(scope="module")
def random_inception_state() -> dict:
    """A state_dict of the FID InceptionV3 with random weights, built without loading any file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return net.state_dict()


def test_offline_missing_inception_weights_fail_fast_and_say_what_to_do(empty_torch_home):
    start = time.perf_counter()
    with pytest.raises(RuntimeFailure) as err:
        InceptionFeatures().prepare(DigitsDataModule(), CPU)
    assert time.perf_counter() - start < 1.0
    expected = empty_torch_home / "hub" / "checkpoints" / INCEPTION_FILE
    for needle in (INCEPTION_FILE, str(expected), INCEPTION_URL, "features.weights_path=", "offline"):
        assert needle in err.value.message, needle


def test_really_offline_the_whole_lookup_takes_under_a_second(tmp_path, monkeypatch):
    """The real network probe (no GENCLI_OFFLINE) on a machine that is offline, as this one is."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("GENCLI_OFFLINE", raising=False)
    if online(INCEPTION_URL):
        pytest.skip("this machine is online: the lookup would download the weights")
    start = time.perf_counter()
    with pytest.raises(RuntimeFailure, match="offline"):
        InceptionFeatures().prepare(DigitsDataModule(), CPU)
    assert time.perf_counter() - start < 1.0


def test_a_weights_path_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"features.weights_path=.*does not exist.*" + INCEPTION_FILE):
        InceptionFeatures(weights_path=str(tmp_path / "nope.pth")).prepare(DigitsDataModule(), CPU)


def test_the_online_probe_gives_up_within_its_timeout():
    start = time.perf_counter()
    assert online("https://gencli-no-such-host.invalid/weights.pth", timeout=0.5) is False
    assert time.perf_counter() - start < 1.0


def test_inception_loads_the_hub_file_and_feeds_fid_kid_and_is(empty_torch_home, random_inception_state, tmp_path):
    path = hub_checkpoint(INCEPTION_FILE)
    assert path == empty_torch_home / "hub" / "checkpoints" / INCEPTION_FILE
    path.parent.mkdir(parents=True)
    torch.save(random_inception_state, path)
    datamodule = DigitsDataModule(seed=0, max_images=40)  # 4 val images: 16x16 grayscale
    features = InceptionFeatures(batch_size=4)
    features.prepare(datamodule, CPU)
    described = features.describe()
    assert described["weights_sha256"] == file_sha256(path) and described["weights_path"] == str(path)
    assert described["comparable_with_papers"] is True
    assert "TensorFlow-1.x" in described["transform"]["resize"] and "299x299" in described["transform"]["resize"]
    assert described["transform"]["channels"] == "grayscale replicated to 3 channels"

    ref = load_or_compute(datamodule, "val", features, None, cache_dir=tmp_path, batch_size=4)
    assert ref.features.shape == (4, 2048) and torch.isfinite(ref.features).all()
    import numpy as np

    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8))
    metrics = [FIDMetric(), KIDMetric(subsets=2), ISMetric(splits=1)]
    out = run_sample_metrics(metrics, FileSource(str(samples), datamodule.image_shape), features, ref, 4, seed=0)
    values = {k: v for m in metrics for k, v in out["values"][id(m)].items()}
    assert set(values) == {"fid", "kid", "kid_std", "is"}  # Inception numbers carry no suffix
    assert all(np.isfinite(v) for v in values.values())

    # the same file given explicitly: same weights, same features
    explicit = InceptionFeatures(weights_path=str(path), batch_size=4)
    explicit.prepare(datamodule, CPU)
    assert explicit.sha256 == features.sha256
    x = datamodule.split("val").images[:2].float() / 127.5 - 1
    torch.testing.assert_close(explicit.features(x), features.features(x))


def test_a_file_that_is_not_inception_weights_is_refused(empty_torch_home):
    path = hub_checkpoint(INCEPTION_FILE)
    path.parent.mkdir(parents=True)
    torch.save({"not": torch.zeros(2)}, path)
    with pytest.raises(RuntimeFailure, match="does not hold the FID InceptionV3 weights"):
        InceptionFeatures().prepare(DigitsDataModule(), CPU)


def test_lpips_without_its_backbone_weights_fails_fast_and_says_what_to_do(empty_torch_home):
    start = time.perf_counter()
    with pytest.raises(RuntimeFailure) as err:
        lpips_metric("alex", CPU)
    assert time.perf_counter() - start < 1.0
    expected = empty_torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    for needle in ("LPIPS", "alexnet-owt-7be5be79.pth", str(expected), "https://download.pytorch.org/models/"):
        assert needle in err.value.message, needle
    with pytest.raises(ConfigError, match="lpips_net='resnet'"):
        lpips_metric("resnet", CPU)
