"""Versions and environment recorded beside every number gencli writes."""

from __future__ import annotations

import platform


def environment() -> dict[str, str]:
    import lightning
    import torch
    import torchmetrics

    from gencli import __version__

    return {
        "gencli": __version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "python": platform.python_version(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
