"""The sample metrics against independent float64 references on small random feature sets.

FID against the formula with scipy's sqrtm, KID against a brute-force unbiased MMD^2 with the cubic
polynomial kernel, PRDC against loops over the definitions, IS against its formula. The metrics are
fed exactly as ``gencli eval`` feeds them: reference statistics (sums + bank) on the real side,
batches of features on the generated side.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from gencli.metrics.prdc import knn_radii, prdc
from gencli.metrics.reference import ReferenceStats
from gencli.metrics.sample_metrics import FIDMetric, ISMetric, KIDMetric, PRDCMetric


def reference_of(real: np.ndarray) -> ReferenceStats:
    f64 = real.astype(np.float64)
    return ReferenceStats(n=len(real), feature_sum=f64.sum(0), outer_sum=f64.T @ f64,
                          features=torch.from_numpy(real.astype(np.float32)), key={}, cache="off")


def feed(metric, ref: ReferenceStats, fake: np.ndarray, logits: np.ndarray | None = None, batch: int = 37,
         seed: int = 0) -> dict[str, float]:
    metric.begin(ref, len(fake))
    for start in range(0, len(fake), batch):
        lg = None if logits is None else torch.from_numpy(logits[start : start + batch])
        metric.update(torch.from_numpy(fake[start : start + batch]), lg)
    torch.manual_seed(seed)
    return metric.finish()


def random_sets(seed: int, n_real: int, n_fake: int, dim: int, shift: float = 0.5):
    rng = np.random.default_rng(seed)
    mix_real, mix_fake = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim)) * 0.7
    real = (rng.normal(size=(n_real, dim)) @ mix_real).astype(np.float32)
    fake = (rng.normal(size=(n_fake, dim)) @ mix_fake + shift).astype(np.float32)
    return real, fake


def fid_numpy(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), float64, unbiased covariances."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed,dim,shift", [(0, 8, 0.5), (1, 16, 0.0), (2, 32, 2.0)])
def test_fid_equals_the_formula_with_scipy_sqrtm(seed, dim, shift):
    real, fake = random_sets(seed, 400, 300, dim, shift)
    ours = feed(FIDMetric(), reference_of(real), fake)["fid"]
    expected = fid_numpy(real, fake)
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
    real, _ = random_sets(3, 300, 10, 12)
    assert abs(feed(FIDMetric(), reference_of(real), real)["fid"]) < 1e-8


def mmd2_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops over the pairs."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


@pytest.mark.parametrize("seed,shift", [(0, 0.3), (1, 0.0)])
def test_kid_equals_brute_force_unbiased_mmd(seed, shift):
    real, fake = random_sets(seed, 60, 60, 6, shift)
    # one subset holding every image: the subset draw is a permutation, which MMD^2 ignores
    values = feed(KIDMetric(subsets=1, subset_size=60), reference_of(real), fake)
    assert values["kid"] == pytest.approx(mmd2_brute_force(real, fake), rel=1e-9, abs=1e-12)


def test_kid_subsets_are_seeded_and_clipped_to_the_sets():
    real, fake = random_sets(4, 80, 50, 6, 0.3)
    a = feed(KIDMetric(subsets=20, subset_size=1000), reference_of(real), fake, seed=7)
    b = feed(KIDMetric(subsets=20, subset_size=1000), reference_of(real), fake, seed=7)
    c = feed(KIDMetric(subsets=20, subset_size=1000), reference_of(real), fake, seed=8)
    assert a == b and a["kid"] != c["kid"]
    metric = KIDMetric(subsets=20, subset_size=1000)
    feed(metric, reference_of(real), fake)
    assert metric.settings()["subset_size"] == 50


def prdc_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The definitions, one point at a time (closed k-NN balls, radii excluding the point itself)."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def dist(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    def radius(points, i):
        return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    in_real_ball = [[dist(y, real[i]) <= r_real[i] for i in range(len(real))] for y in fake]
    precision = np.mean([any(row) for row in in_real_ball])
    recall = np.mean([any(dist(x, fake[j]) <= r_fake[j] for j in range(len(fake))) for x in real])
    density = sum(sum(row) for row in in_real_ball) / (k * len(fake))
    coverage = np.mean([any(dist(real[i], y) <= r_real[i] for y in fake) for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("seed,k,chunk,shift", [(0, 3, 7, 0.5), (1, 5, 1024, 0.0), (2, 1, 16, 0.2)])
def test_prdc_equals_brute_force(seed, k, chunk, shift):
    real, fake = random_sets(seed, 45, 38, 5, shift)
    expected = prdc_brute_force(real, fake, k)
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), k=k, chunk=chunk)
    assert set(ours) == set(expected)
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-12), key
    assert sum(0 < v < 1 for v in ours.values()) >= 3  # a case where the balls partly overlap, not a trivial 0 or 1


def test_prdc_metric_streams_in_batches_and_caps_samples():
    real, fake = random_sets(5, 50, 70, 4, 0.4)
    metric = PRDCMetric(nearest_k=3, max_samples=40, chunk=9)
    values = feed(metric, reference_of(real), fake, batch=13)
    expected = prdc_brute_force(real[:40], fake[:40], 3)
    for key in expected:
        assert values[key] == pytest.approx(expected[key], abs=1e-12)
    assert metric.settings()["n_generated_used"] == 40 and metric.settings()["n_real_used"] == 40


def test_prdc_of_identical_sets():
    real, _ = random_sets(6, 40, 1, 4)
    values = prdc(torch.from_numpy(real), torch.from_numpy(real.copy()), k=3)
    assert values["precision"] == values["recall"] == values["coverage"] == 1.0


def test_knn_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, 1, chunk=3).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2, chunk=2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_inception_score_equals_its_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(90, 7)) * 2
    values = feed(ISMetric(splits=1), reference_of(np.zeros((2, 1), np.float32)), np.zeros((90, 1), np.float32),
                  logits=logits)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    marginal = p.mean(0)
    expected = np.exp(np.mean([np.sum(row * (np.log(row) - np.log(marginal))) for row in p]))
    assert values["is"] == pytest.approx(expected, rel=1e-9)


def test_every_combination_of_batch_sizes_gives_the_same_fid():
    real, fake = random_sets(7, 120, 100, 6)
    values = {batch: feed(FIDMetric(), reference_of(real), fake, batch=batch)["fid"] for batch in (1, 7, 100)}
    for a, b in itertools.combinations(values.values(), 2):
        assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("build, needle", [
    (lambda: KIDMetric(subsets=0), "metric.kid.subsets=0"),
    (lambda: KIDMetric(subset_size=1), "metric.kid.subset_size=1"),
    (lambda: KIDMetric(coef=0), "metric.kid.coef=0"),
    (lambda: KIDMetric(gamma="big"), "metric.kid.gamma='big'"),
    (lambda: PRDCMetric(nearest_k=0), "metric.prdc.nearest_k=0"),
    (lambda: PRDCMetric(chunk=-1), "metric.prdc.chunk=-1"),
    (lambda: ISMetric(splits=0), "metric.is.splits=0"),
])
def test_bad_metric_settings_fail_when_the_metric_is_built(build, needle):
    from gencli.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        build()


def test_an_integer_kid_gamma_works_like_the_float():
    """torchmetrics refuses gamma=1 (an int), which is what a command line like metric.kid.gamma=1 gives."""
    real, fake = random_sets(2, 40, 30, 4, 0.5)
    as_int = feed(KIDMetric(subsets=1, subset_size=30, gamma=1), reference_of(real), fake)
    as_float = feed(KIDMetric(subsets=1, subset_size=30, gamma=1.0), reference_of(real), fake)
    assert as_int == as_float


def rank_deficient(seed: int = 0, n: int = 40, dim: int = 64) -> np.ndarray:
    """Fewer images than dimensions, non-negative like pool3 features: the covariance's zero eigenvalues come out
    of the eigen-solver slightly negative, so FID of a set against itself lands just below 0."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 3 + 1, 0).astype(np.float32)


def test_fid_of_identical_sets_is_zero_with_a_note_on_rounding():
    """Two identical sets gave FID -1.5e-06: a distance below 0 by rounding is 0, with the raw value in a note."""
    from torchmetrics.image.fid import _compute_fid

    real = rank_deficient()
    f64 = torch.from_numpy(real).double()
    raw = float(_compute_fid(f64.mean(0), torch.cov(f64.T), f64.mean(0), torch.cov(f64.T)))
    assert raw < 0  # the case: torchmetrics' own value is negative
    metric = FIDMetric()
    value = feed(metric, reference_of(real), real)["fid"]
    assert value == 0.0
    notes = metric.reader_notes()
    assert len(notes) == 1 and "within float64 rounding of 0" in notes[0] and "reported as 0" in notes[0]
    assert notes[0] in metric.settings()["notes"]
    # sets that differ keep their value and get no note
    other = FIDMetric()
    assert feed(other, reference_of(real), rank_deficient(seed=1))["fid"] > 1 and other.reader_notes() == []


def test_a_clearly_negative_fid_is_a_failure_not_clamped():
    from gencli.errors import RuntimeFailure
    from gencli.metrics.sample_metrics import fid_rounding_tolerance, settle_fid

    cov = torch.cov(torch.from_numpy(rank_deficient()).double().T)
    tolerance = fid_rounding_tolerance(cov, cov)
    assert 0 < tolerance < 1e-2
    assert settle_fid(-tolerance / 2, cov, cov)[0] == 0.0
    assert settle_fid(3.5, cov, cov) == (3.5, None)
    with pytest.raises(RuntimeFailure, match=r"FID came out as -0.5, below -.*a Fréchet distance cannot be negative"):
        settle_fid(-0.5, cov, cov)


def test_intra_fid_per_class_rounding_is_zero_with_a_note():
    from gencli.metrics.conditional import frechet_distance

    same = torch.from_numpy(rank_deficient(seed=2)).double()
    notes: list[str] = []
    assert frechet_distance(same, same, notes, "class 3's FID") == 0.0
    assert len(notes) == 1 and notes[0].startswith("class 3's FID computed as -")


def test_a_negative_kid_is_reported_unclamped_with_a_note():
    """KID is an unbiased estimator: for alike sets it scatters around 0, so a slightly negative value is legitimate
    and kept (clamping would bias it); the reader is told why."""
    real = rank_deficient(seed=3, n=60, dim=8)
    metric = KIDMetric(subsets=5, subset_size=60)
    value = feed(metric, reference_of(real), real)["kid"]
    assert value < 0
    assert any("unbiased" in note and "reported unclamped" in note for note in metric.reader_notes())
