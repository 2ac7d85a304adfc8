"""Diffusion processes apart from networks: the noise schedule and the samplers (as diffusers splits them)."""

from gencli.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2M, HeunSampler, Sampler
from gencli.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "Sampler", "DDPMSampler", "DDIMSampler", "DPMSolverPP2M", "HeunSampler"]
