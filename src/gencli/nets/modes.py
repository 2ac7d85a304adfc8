"""``eval_mode``: run a module in eval mode (no dropout, BatchNorm on running statistics), then restore its mode.

Sampling during training (grids, in-training metrics, collapse checks) and shape probes at construction all need
this, and all must hand the module back in the mode Lightning left it in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
