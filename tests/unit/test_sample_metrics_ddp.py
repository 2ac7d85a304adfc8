"""Sample metrics split across processes equal the single-process values on the same samples.

Real ranks: a gloo process group of 2 (or 3) CPU processes started with torch.multiprocessing (spawn),
each running :func:`run_sample_metrics` with a :class:`Shard`, i.e. generating only its contiguous
block of the ``n`` images (per-image seeds: image ``i`` is the same image on any rank), extracting
their features, and combining the metric states through torchmetrics' distributed sync (FID, KID, IS)
and an all-gather (PRDC). The parent computes the same metrics in one process on the same model and
seed. Every rank must end with the same values as every other rank (exactly: they compute from the
same combined states), and with the single-process values up to float rounding.

Tolerance: ``rel=1e-6`` (``abs=1e-9`` near zero). The ranks batch their blocks differently from the
single process (batch_size 4 over 37 images: blocks of 18 and 19 start mid-batch), and float32
kernels (the generator's tanh, the extractor's matmul) may round a row differently in another batch
shape: a few float32 ulps (~1e-7 relative) in a feature, which FID's float64 maths carries through at
that order. The states themselves are combined in float64 (sums of per-rank sums instead of one
running sum: ~1e-16 relative). A real-side counted twice (the bug the combination must avoid: the
cached real sums on every rank, summed by the sync) changes FID's covariance by n/(n-1) vs
2n/(2n-1), KID's real bank by duplication: both far outside the tolerance, as the control shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gencli.data import DigitsDataModule
from gencli.metrics.features import DomainFeatures
from gencli.metrics.reference import ReferenceStats
from gencli.metrics.sample_metrics import (
    FIDMetric,
    ISMetric,
    KIDMetric,
    PRDCMetric,
    Shard,
    prepare_features_and_reference,
    run_sample_metrics,
)
from gencli.metrics.sources import ModelSource
from gencli.seeds import randn

REL, ABS = 1e-6, 1e-9
SHAPE = (1, 8, 8)


class TinyModel:
    """A 'generative model': a fixed random linear map of per-image noise (through gencli.seeds.randn)."""

    def __init__(self):
        g = torch.Generator().manual_seed(123)
        self.weight = torch.randn(16, int(np.prod(SHAPE)), generator=g) / 4

    def sample(self, n, generator=None):
        z = randn((n, 16), generator)
        return torch.tanh(z @ self.weight).reshape(n, *SHAPE)

    def sampling_info(self):
        return {"family": "tiny"}


class LinearFeatures:
    """A feature extractor: features (D=6) and logits (K=4) from fixed random projections."""

    name = "linear"
    feature_dim = 6

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.features_w = torch.randn(int(np.prod(SHAPE)), 6, generator=g)
        self.logits_w = torch.randn(6, 4, generator=g)

    def extract(self, images):
        f = images.reshape(len(images), -1) @ self.features_w
        return f, f @ self.logits_w


def reference() -> ReferenceStats:
    rng = np.random.default_rng(3)
    real = (rng.normal(size=(50, 6)) * 3 + 0.5).astype(np.float32)
    f64 = real.astype(np.float64)
    return ReferenceStats(n=50, feature_sum=f64.sum(0), outer_sum=f64.T @ f64, features=torch.from_numpy(real), key={},
                          cache="off")


def all_metrics(n: int):
    metrics = {"fid": FIDMetric(), "kid": KIDMetric(subsets=20, subset_size=15)}
    if n >= 10:
        metrics |= {"is": ISMetric(splits=3), "prdc": PRDCMetric(nearest_k=3, max_samples=25, chunk=7)}
    return metrics


def measure(n: int, shard: Shard | None, batch_size: int = 4) -> dict[str, float]:
    metrics = all_metrics(n)
    out = run_sample_metrics(list(metrics.values()), ModelSource(TinyModel(), n, seed=5), LinearFeatures(),
                             reference(), batch_size, seed=0, shard=shard)
    values = {k: v for metric in metrics.values() for k, v in out["values"][id(metric)].items()}
    return {**values, "n_here": out["n_here"], "prdc_used": metrics["prdc"].kept if "prdc" in metrics else None}


def naive_measure(n: int, shard: Shard) -> dict[str, float]:
    """The control: every rank sets the cached real side, as one process does (what the sync must not see)."""
    fid, kid = FIDMetric(), KIDMetric(subsets=20, subset_size=15)
    everyone = Shard(0, shard.world_size, shard.device)  # rank 0's begin: real side held, on every rank
    ref = reference()
    for metric in (fid, kid):
        metric.begin(ref, n, shard=everyone)
    from gencli.metrics.sample_metrics import ModelBlock

    for images, _ in ModelBlock(ModelSource(TinyModel(), n, seed=5), *shard.block(n)).stream(4):
        features, logits = LinearFeatures().extract(images)
        fid.update(features, logits)
        kid.update(features, logits)
    torch.manual_seed(0)
    return {"fid": fid.finish()["fid"], "kid": kid.finish()["kid"]}


def domain_pass(cache: Path, shard: Shard | None) -> dict:
    """The SampleQuality path on real data: the domain classifier (trained on first use) and the reference cache."""
    datamodule = DigitsDataModule(seed=0, max_images=300, image_size=8)
    features = DomainFeatures(cache_dir=str(cache), epochs=1, min_accuracy=0.0)  # 1 epoch: a weak one
    ref = prepare_features_and_reference(features, datamodule, torch.device("cpu"), "val", None, cache, 16, True, shard)
    fid, kid = FIDMetric(), KIDMetric(subsets=10, subset_size=20)
    out = run_sample_metrics([fid, kid], ModelSource(TinyModel(), 21, seed=1), features, ref, 8, seed=0, shard=shard)
    return {"fid": out["values"][id(fid)]["fid_domain"], "kid": out["values"][id(kid)]["kid_domain"],
            "classifier": features.info["cache"], "reference": ref.cache}


def worker(rank: int, world: int, what: str, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        shard = Shard.of_process_group("cpu")
        assert shard == Shard(rank, world)
        if what == "metrics":
            result = {n: measure(n, shard) for n in (37, 2, 3)}
            result["naive"] = naive_measure(37, shard)
        else:
            result = domain_pass(Path(tmp) / "cache", shard)
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, world: int, what: str) -> list[dict]:
    mp.spawn(worker, args=(world, what, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_close(split: dict, single: dict, what: str) -> None:
    for key, value in single.items():
        if key in ("n_here", "prdc_used"):
            continue
        assert split[key] == pytest.approx(value, rel=REL, abs=ABS), (what, key, split[key], value)


@pytest.mark.parametrize("world", [2, 3])
def test_split_across_ranks_equals_one_process(tmp_path, world):
    ranks = run_ranks(tmp_path, world, "metrics")
    for n in (37, 2, 3):
        single = measure(n, None)
        for rank, result in enumerate(ranks):
            assert result[n] | {"n_here": 0} == ranks[0][n] | {"n_here": 0}, (n, rank)  # every rank: the same values
            assert_close(result[n], single, f"n={n} rank {rank}")
            start, stop = Shard(rank, world).block(n)
            assert result[n]["n_here"] == stop - start
        assert sum(result[n]["n_here"] for result in ranks) == n
        if n == 37:
            assert ranks[0][n]["prdc_used"] == 25  # the first max_samples images, from both ranks' blocks
            diffs = {k: abs(ranks[0][n][k] - v) / max(abs(v), 1e-300) for k, v in single.items()
                     if isinstance(v, float)}
            print(f"world={world} n=37 relative differences to one process: "
                  + ", ".join(f"{k}={d:.1e}" for k, d in diffs.items()))
    # with 3 ranks and n=2 rank 0 has no image (it holds only the real side): still the same numbers
    assert world == 2 or ranks[0][2]["n_here"] == 0
    # the control: the cached real side on every rank would be counted world_size times
    naive = ranks[0]["naive"]
    single = measure(37, None)
    assert abs(naive["fid"] - single["fid_linear"]) > 1e-3 * abs(single["fid_linear"])
    assert abs(naive["kid"] - single["kid_linear"]) > 1e-3 * abs(single["kid_linear"])


def test_domain_classifier_and_reference_are_prepared_by_rank_0_and_read_by_the_others(tmp_path):
    first, second = run_ranks(tmp_path, 2, "domain")
    assert first["classifier"] == "trained now" and second["classifier"] == "hit"  # no second training, no race
    assert first["reference"] == "miss" and second["reference"] == "hit"
    assert (first["fid"], first["kid"]) == (second["fid"], second["kid"])
    assert len(list((tmp_path / "cache" / "domain").iterdir())) == 1
    single = domain_pass(tmp_path / "cache", None)  # one process, from the caches rank 0 wrote
    assert single["classifier"] == "hit" and single["reference"] == "hit"
    assert first["fid"] == pytest.approx(single["fid"], rel=REL, abs=ABS)
    assert first["kid"] == pytest.approx(single["kid"], rel=REL, abs=ABS)
    print(f"domain: FID {first['fid']!r} (2 ranks) vs {single['fid']!r} (1 process); KID {first['kid']!r} vs "
          f"{single['kid']!r}")
