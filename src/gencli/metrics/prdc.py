"""Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) on features.

With real features X (N x D), fake features Y (M x D) and k, every point's k-NN radius is the
distance to its k-th nearest neighbour in its own set, itself excluded (NND_k). Balls are closed
(distance <= radius), as in Kynkäänniemi et al.'s definition:

- precision = (1/M) sum_j 1[Y_j is inside some real ball B(X_i, NND_k(X_i))]
- recall    = (1/N) sum_i 1[X_i is inside some fake ball B(Y_j, NND_k(Y_j))]
- density   = 1/(kM) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]
- coverage  = (1/N) sum_i 1[the real ball B(X_i, NND_k(X_i)) holds at least one Y_j]

(The authors' reference code uses strict ``<``; the two differ only on exact ties, which continuous
features do not have, while closed balls keep identical sets at precision = recall = 1.)

Distances are computed in float64, ``chunk`` rows at a time, so memory stays at chunk x max(N, M)
doubles however large the sets are.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances (float64) between the rows of ``a`` and ``b``."""
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2 * a @ b.T
    return sq.clamp_min(0).sqrt()


def knn_radii(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {len(x)}")
    radii = []
    for start in range(0, len(x), chunk):
        d = pairwise_distances(x[start : start + chunk], x)
        rows = torch.arange(len(d))
        d[rows, rows + start] = float("inf")  # exclude the point itself
        radii.append(d.kthvalue(k, dim=1).values)
    return torch.cat(radii)


@torch.no_grad()
def prdc(real: Tensor, fake: Tensor, k: int = 5, chunk: int = 1024) -> dict[str, float]:
    real, fake = real.double(), fake.double()
    real_radii = knn_radii(real, k, chunk)
    fake_radii = knn_radii(fake, k, chunk)
    inside_real_balls = torch.zeros(len(fake), dtype=torch.float64)  # per fake: how many real balls hold it
    for start in range(0, len(fake), chunk):
        d = pairwise_distances(fake[start : start + chunk], real)  # (chunk, N)
        inside_real_balls[start : start + len(d)] = (d <= real_radii[None, :]).sum(1).double()
    recalled = torch.zeros(len(real), dtype=torch.bool)
    covered = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(real), chunk):
        d = pairwise_distances(real[start : start + chunk], fake)  # (chunk, M)
        recalled[start : start + len(d)] = (d <= fake_radii[None, :]).any(1)
        covered[start : start + len(d)] = d.min(1).values <= real_radii[start : start + len(d)]
    return {
        "precision": float((inside_real_balls > 0).double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(inside_real_balls.sum() / (k * len(fake))),
        "coverage": float(covered.double().mean()),
    }
