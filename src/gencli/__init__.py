"""gencli: train, sample and evaluate image generative models from one Hydra-driven CLI."""

__version__ = "0.1.0"
