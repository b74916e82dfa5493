"""Samplers whose steps have a log-probability. One module per member; the family picks its default."""

from .base import Sampler, StepOutput
from .ddim import DDIMSampler
from .flow_sde import FlowSDESampler

__all__ = ["DDIMSampler", "FlowSDESampler", "Sampler", "StepOutput"]
