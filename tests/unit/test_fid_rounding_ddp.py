"""FID of identical sets split across processes: the rounding check reads the combined covariances.

A FID just below 0 is settled against the covariances of *all* ranks' images (``sync_context``, a collective every
rank joins, as every rank computed the same negative value): 0 with the same note on every rank, as in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_sample_metrics_ddp import LinearFeatures, TinyModel

from gencli.metrics.reference import ReferenceStats
from gencli.metrics.sample_metrics import FIDMetric, Shard, run_sample_metrics
from gencli.metrics.sources import ModelSource

N = 5  # fewer images than the 6 feature dimensions: rank-deficient covariances, FID of a set with itself < 0


def own_reference() -> ReferenceStats:
    """The reference is the generated images themselves: FID 0 up to rounding."""
    source = ModelSource(TinyModel(), N, seed=5)
    features = torch.cat([LinearFeatures().extract(images)[0] for images, _ in source.stream(N)])
    f64 = features.double().numpy()
    return ReferenceStats(n=N, feature_sum=f64.sum(0), outer_sum=f64.T @ f64, features=features, key={}, cache="off")


def measure(shard: Shard | None) -> tuple[float, list[str], float]:
    from torchmetrics.image.fid import _compute_fid

    ref = own_reference()
    f64 = ref.features.double()
    raw = float(_compute_fid(f64.mean(0), torch.cov(f64.T), f64.mean(0), torch.cov(f64.T)))
    fid = FIDMetric()
    out = run_sample_metrics([fid], ModelSource(TinyModel(), N, seed=5), LinearFeatures(), ref, 2, seed=0, shard=shard)
    return out["values"][id(fid)]["fid_linear"], fid.reader_notes(), raw


def worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        torch.save(measure(Shard.of_process_group("cpu")), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_identical_sets_split_across_ranks_give_fid_zero_with_the_note(tmp_path):
    value, notes, raw = measure(None)
    assert raw < 0, "the case needs a negative raw FID"
    assert value == 0.0 and len(notes) == 1 and "within float64 rounding of 0" in notes[0]
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        split_value, split_notes, _ = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert split_value == 0.0 and len(split_notes) == 1 and "within float64 rounding of 0" in split_notes[0]
