"""Lightning callbacks: sample grids during training (more guards are added by later families)."""

from gencli.callbacks.sample_grid import SampleGrid

__all__ = ["SampleGrid"]
