"""LightningModules, one per family: each holds its loss and optimisation, and no file I/O."""

from gencli.families.base import GenerativeModel

__all__ = ["GenerativeModel"]
