"""DDIM with eta > 0: each step is a Gaussian policy (SD1.x and SDXL)."""

from __future__ import annotations

import math

from .base import Sampler, StepOutput


class DDIMSampler(Sampler):
    """
    The DDIM step with noise of scale ``eta`` (TRL's DDPO step, which also returns the log-probability).

    Args:
        eta (`float`): DDIM eta; must be > 0, or the step is deterministic and has no log-probability.
    """

    name = "ddim"

    def __init__(self, eta: float = 1.0):
        self.eta = eta

    def validation_errors(self) -> list[str]:
        if not (self.eta > 0 and math.isfinite(self.eta)):
            return [
                f"sample_eta must be > 0, got {self.eta}: with eta = 0 DDIM is deterministic and the "
                "transitions have no log-probability to optimise."
            ]
        return []

    def step(self, scheduler, model_output, timestep, sample, *, generator=None, prev_sample=None) -> StepOutput:
        from trl.models.modeling_sd_base import scheduler_step

        out = scheduler_step(
            scheduler, model_output, timestep, sample, eta=self.eta, generator=generator, prev_sample=prev_sample
        )
        return StepOutput(prev_sample=out.latents, log_prob=out.log_probs)
