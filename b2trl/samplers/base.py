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

    def describe(self) -> str:
        """A short description for model cards and logs (e.g. ``"DDIM, eta 1.0"``)."""
        return self.name

    def validation_errors(self) -> list[str]:
        """Every problem with this sampler's settings, one message each, naming the field and the fix."""
        return []

    def timesteps(self, scheduler, num_inference_steps: int, device, **schedule) -> torch.Tensor:
        """Set `scheduler` up for `num_inference_steps` steps and return its timesteps, first step first.
        `schedule` holds the model family's extra ``set_timesteps`` arguments
        ([`~b2trl.models.ModelFamily.schedule_kwargs`]), e.g. a flow model's ``sigmas`` and shift ``mu``."""
        scheduler.set_timesteps(num_inference_steps, device=device, **schedule)
        return scheduler.timesteps

    def prefix_sampler(self) -> "Sampler":
        """The sampler of a branch rollout's shared prefix, which is not recorded: this one unless a member
        chooses another (a flow-matching SDE may run its prefix as the deterministic ODE)."""
        return self

    def suffix_sampler(self) -> "Sampler":
        """The sampler that finishes each branch after a start-anchored interval (steps that are not recorded):
        this one unless a member chooses another (a flow-matching SDE may run it as the ODE)."""
        return self

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

    def mean_and_std(self, scheduler, model_output, timestep, sample) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's Gaussian: its mean ``(B, ...)`` and standard deviation (broadcastable to the mean)."""
        raise NotImplementedError

    def kl_divergence(self, scheduler, model_output, reference_output, timestep, sample) -> torch.Tensor:
        """
        ``KL(π_θ ‖ π_ref)`` of one step from `sample` for each row, where the two policies' predictions are
        `model_output` and `reference_output`. Both Gaussians share the step's standard deviation, so the KL is
        the squared distance between their means over twice the variance, averaged over the latent's dimensions
        (as the log-probability is).
        """
        mean, std = self.mean_and_std(scheduler, model_output, timestep, sample)
        reference_mean, _ = self.mean_and_std(scheduler, reference_output, timestep, sample)
        kl = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)
        return kl.mean(dim=tuple(range(1, kl.ndim)))

    def timestep_batch(self, timestep, batch_size: int, device) -> torch.Tensor:
        """`timestep` as one entry per row, in the dtype the denoiser takes (integer steps for DDIM)."""
        return torch.full((batch_size,), int(timestep), device=device, dtype=torch.long)
