"""Per-machine performance settings, kept apart from the Lightning strategy (``conf/hardware/``).

The same model and trainer configs run on a laptop CPU and on an H100; what changes between them is
here: numeric precision, TF32 matmuls, channels-last memory layout, ``torch.compile``, and how
many loader workers feed the GPU. Precision, workers and pin-memory reach the trainer and data
configs by interpolation (``${hardware.precision}``); the rest is applied by :meth:`apply`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gencli.errors import ConfigError

PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine")
MATMUL = ("highest", "high", "medium")


@dataclass
class HardwareSettings:
    precision: str = "32-true"
    matmul_precision: str = "highest"
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0
    pin_memory: bool = False

    def __post_init__(self):
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"hardware.precision={self.precision} is not known; use one of {', '.join(PRECISIONS[:7])}.")
        if self.matmul_precision not in MATMUL:
            raise ConfigError(f"hardware.matmul_precision={self.matmul_precision} is not known; use highest, high or medium.")
        if self.num_workers < 0:
            raise ConfigError(f"hardware.num_workers={self.num_workers} must be >= 0.")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set process-wide matmul precision, then memory layout and compilation of ``model``'s nets."""
        torch.set_float32_matmul_precision(self.matmul_precision)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            # Compile the plain nets in place (nn.Module.compile keeps state_dict keys unchanged, so
            # checkpoints load without compile); the training logic itself stays eager.
            for child in model.children():
                if any(p.requires_grad for p in child.parameters()):
                    child.compile()
        return model
