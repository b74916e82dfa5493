"""What a sampler provides: one stochastic denoising step with the log-probability of its transition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class StepOutput:
    """
    One denoising step of a batch.

    Attributes:
        prev_sample: ``(B, ...)`` the next latent (sampled, or the one that was given).
        log_prob: ``(B,)`` log-probability of the transition under the step's Gaussian, averaged over the
            latent's dimensions (as DDPO does).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor


class Sampler:
    """
    A stochastic sampler whose steps are Gaussian policies: the member of the sampler seam.

    A member implements [`Sampler.timesteps`], [`Sampler.step`] and, when some settings make its steps
    deterministic, [`Sampler.validation_errors`]. The branch rollout and the trainer only call these, so a new
    sampler is one new module in ``b2trl/samplers/``.
    """

    name: str = "sampler"

    def validation_errors(self) -> list[str]:
        """Every problem with this sampler's settings, one message each, naming the field and the fix."""
        return []

    def timesteps(self, scheduler, num_inference_steps: int, device) -> torch.Tensor:
        """Set `scheduler` up for `num_inference_steps` steps and return its timesteps, first step first."""
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps

    def initial_noise_sigma(self, scheduler) -> float:
        """Scale of the initial noise."""
        return float(getattr(scheduler, "init_noise_sigma", 1.0))

    def step(
        self,
        scheduler,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        prev_sample: Optional[torch.Tensor] = None,
    ) -> StepOutput:
        """
        One step from `sample` at `timestep`. Draws the next latent, or, given `prev_sample`, scores that one
        (the log-probability a recorded transition has under the current model).
        """
        raise NotImplementedError

    def timestep_batch(self, timestep, batch_size: int, device) -> torch.Tensor:
        """`timestep` as one entry per row, in the dtype the denoiser takes (integer steps for DDIM)."""
        return torch.full((batch_size,), int(timestep), device=device, dtype=torch.long)
