"""Per-machine performance settings, kept apart from the Lightning strategy (``conf/hardware/``).

The same model and trainer configs run on a laptop CPU and on an H100; what changes between them is
here: numeric precision, TF32 matmuls, channels-last memory layout, ``torch.compile``, the optimiser's
update kernel (one fused kernel or one tensor at a time), and how many loader workers feed the GPU. Precision, workers and pin-memory reach the trainer and data
configs by interpolation (``${hardware.precision}``); the rest is applied by :meth:`apply`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gencli.errors import ConfigError

PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine")
MATMUL = ("highest", "high", "medium")
#: How optimisers update: torch's choice (foreach on CUDA, one tensor at a time on CPU), or one of its kernels.
OPTIMIZER_KERNELS = ("auto", "single", "foreach", "fused")
#: torch.compile's modes ("default" is torch's own; reduce-overhead adds CUDA graphs, which cut launch overhead at 32x32).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: When the training step waits for the device: every step (a NaN stops the run at that step, the CPU default) or
#: only on logging steps (the finite checks stay on the device and a non-finite step is skipped there: see
#: callbacks.non_finite). Each wait is a GPU->CPU sync that idles the GPU between small steps.
HOST_SYNCS = ("step", "log")
#: Whether the training images live on the training device (as uint8, converted and flipped there): see
#: data.base.ImageDataModule.on_device. auto = on a GPU when the set is in memory and small beside the GPU's memory.
DATA_ON_DEVICE = ("false", "true", "auto")


@dataclass
class HardwareSettings:
    precision: str = "32-true"
    matmul_precision: str = "highest"
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    optimizer_kernel: str = "auto"
    compile_mode: str = "default"
    host_sync: str = "step"
    data_on_device: bool | str = False

    def __post_init__(self):
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"hardware.precision={self.precision} is not known; use one of {', '.join(PRECISIONS[:7])}.")
        if self.matmul_precision not in MATMUL:
            raise ConfigError(f"hardware.matmul_precision={self.matmul_precision} is not known; use highest, high or medium.")
        if self.num_workers < 0:
            raise ConfigError(f"hardware.num_workers={self.num_workers} must be >= 0.")
        if self.optimizer_kernel not in OPTIMIZER_KERNELS:
            raise ConfigError(f"hardware.optimizer_kernel={self.optimizer_kernel} is not known; use one of "
                              f"{', '.join(OPTIMIZER_KERNELS)}.")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"hardware.compile_mode={self.compile_mode} is not a torch.compile mode; use one of "
                              f"{', '.join(COMPILE_MODES)}.")
        if self.host_sync not in HOST_SYNCS:
            raise ConfigError(f"hardware.host_sync={self.host_sync} is not known; use step (wait for the device at "
                              "every step: the default) or log (only at logging steps, for GPUs).")
        # YAML reads true/false as booleans; keep one spelling
        self.data_on_device = str(self.data_on_device).lower()
        if self.data_on_device not in DATA_ON_DEVICE:
            raise ConfigError(f"hardware.data_on_device={self.data_on_device} is not known; use false, true or auto.")

    def gpu_settings(self) -> list[str]:
        """The settings of this profile that are made for a GPU (half precision, pinned memory, many workers)."""
        import os

        found = []
        if self.precision in ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine"):
            found.append(f"precision={self.precision} (CPU autocast is rarely faster and changes the numbers)")
        if self.pin_memory:
            found.append("pin_memory=true (pinning only helps copies to a GPU)")
        if self.num_workers > (os.cpu_count() or 1):
            found.append(f"num_workers={self.num_workers} (more loader processes than this machine's "
                         f"{os.cpu_count()} cores, which the training itself needs)")
        return found

    def mismatch(self, accelerator: str, profile: str | None = None) -> str | None:
        """A warning when a GPU profile meets a CPU trainer (``hardware=gpu_fast trainer=cpu``), else None: the run
        works, but slower or different from what the profile promises, so say so before it starts."""
        found = self.gpu_settings()
        if str(accelerator) != "cpu" or not found:
            return None
        name = f"hardware={profile}" if profile else "the hardware settings"
        return (f"{name} is made for a GPU but trainer.accelerator=cpu: {'; '.join(found)}. For a CPU run use "
                "hardware=cpu_fast (or hardware=default); for a GPU run add trainer=gpu.")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set process-wide matmul precision, then memory layout and compilation of ``model``'s nets."""
        torch.set_float32_matmul_precision(self.matmul_precision)
        # read by the families' configure_optimizers (families.base.build_optimizer): fused Adam updates every
        # parameter in one kernel (CPU too: 10.5 -> 2.0 ms a step for the 1.1M-parameter unet_cpu), same maths
        model.optimizer_kernel = self.optimizer_kernel
        # read by the NonFiniteGuard (callbacks.non_finite) when the trainer starts
        model.host_sync = self.host_sync
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            # Compile the plain nets in place (nn.Module.compile keeps state_dict keys unchanged, so
            # checkpoints load without compile); the training logic itself stays eager.
            for child in model.children():
                if any(p.requires_grad for p in child.parameters()):
                    child.compile(mode=None if self.compile_mode == "default" else self.compile_mode)
        return model


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc reuse freed blocks up to ``limit_bytes`` instead of handing them back to the OS.

    By default glibc serves every allocation above 32 MB with a fresh mmap and unmaps it when freed,
    so a CPU forward pass over a large batch (a diffusion sampler at batch 256: activations of
    34 MB) page-faults its memory in again at every step. Measured here (2 cores, DDIM-10, 256
    images at batch 256): 26.5 s wall with 18 s of it in the kernel, 17.8 s with this (1.2 s kernel).
    Only the allocator's thresholds change; peak memory does not grow beyond what the run used
    anyway. A no-op (False) off glibc Linux.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes) and libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes))
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False
