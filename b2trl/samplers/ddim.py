"""DDIM with eta > 0: each step is a Gaussian policy (SD1.x and SDXL)."""

from __future__ import annotations

import math

import torch

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

    def describe(self) -> str:
        return f"DDIM, eta {self.eta}"

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

    def mean_and_std(self, scheduler, model_output, timestep, sample):
        config = scheduler.config
        step_size = config.num_train_timesteps // scheduler.num_inference_steps
        # the previous timestep is clamped at 0 as in the sampling step, so the last step uses alphas_cumprod[0]
        prev_timestep = torch.clamp(timestep - step_size, 0, config.num_train_timesteps - 1)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        alphas = scheduler.alphas_cumprod
        alpha = alphas.gather(0, timestep.cpu()).to(sample.device).reshape(shape)
        alpha_prev = alphas.gather(0, prev_timestep.cpu()).to(sample.device).reshape(shape)
        if config.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        elif config.prediction_type == "v_prediction":
            x0 = alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
            eps = alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        else:
            raise ValueError(f"DDIMSampler supports epsilon and v_prediction models, not {config.prediction_type!r}.")
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
        std = self.eta * variance**0.5
        mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        return mean, std
