"""Samplers whose steps have a log-probability. One module per member; the family picks its default."""

from .base import Sampler, StepOutput
from .ddim import DDIMSampler

__all__ = ["DDIMSampler", "Sampler", "StepOutput"]
