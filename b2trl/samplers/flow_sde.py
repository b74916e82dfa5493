"""The flow-matching SDE step: a stochastic Euler step whose transition is a Gaussian (SD3 and SD3.5).

A rectified-flow model predicts a velocity ``v`` and its sampler integrates the ODE ``dx = v dσ`` from σ = 1
(noise) to σ = 0 (data) with Euler steps. That step is deterministic, so it has no log-probability to optimise.
This sampler turns it into the Euler–Maruyama step of an SDE with the same marginals, with noise of scale
``a = noise_level``; per step, with ``dt = σ_next − σ < 0``::

    std_t = a · sqrt(σ / (1 − σ))
    μ     = x · (1 + std_t² / (2σ) · dt) + v · (1 + std_t² (1 − σ) / (2σ)) · dt
    x'    = μ + std_t · sqrt(−dt) · ε,        ε ~ N(0, I)

so the transition is ``N(μ, (std_t·sqrt(−dt))²)``. At σ = 1 the denominator ``1 − σ`` is zero; the step uses
the schedule's next sigma there instead. With ``a = 0`` the step is the plain Euler step of the scheduler.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import Sampler, StepOutput

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class FlowSDESampler(Sampler):
    """
    The SDE step for flow-matching models on a `FlowMatchEulerDiscreteScheduler` schedule, with the
    log-probability of every transition (computed in float32, averaged over the latent's dimensions).

    Timesteps are the scheduler's floats (``σ · num_train_timesteps``); a step finds its σ and the next one by
    looking its timestep up in the scheduler's schedule, so rows of one batch may be at different steps.

    Args:
        noise_level (`float`, *optional*, defaults to `0.7`):
            ``a``, the scale of the step's noise. Training needs ``a > 0``; ``a = 0`` is the deterministic ODE
            (sampling only: its steps have no log-probability and are reported as NaN).
        prefix_sde (`bool`, *optional*, defaults to `False`):
            Whether the shared, unrecorded prefix of a branch rollout also uses the SDE step. By default it runs
            the ODE (see [`FlowSDESampler.prefix_sampler`]).
        suffix_sde (`bool`, *optional*, defaults to `False`):
            Whether the unrecorded steps that finish each branch after a start-anchored interval use the SDE
            step. By default they run the ODE, so a branch's image is a deterministic function of where its
            interval ended (see [`FlowSDESampler.suffix_sampler`]).
    """

    name = "flow_sde"

    def __init__(self, noise_level: float = 0.7, *, prefix_sde: bool = False, suffix_sde: bool = False):
        self.noise_level = float(noise_level)
        self.prefix_sde = prefix_sde
        self.suffix_sde = suffix_sde

    def describe(self) -> str:
        prefix = "SDE" if self.prefix_sde else "ODE"
        suffix = "SDE" if self.suffix_sde else "ODE"
        return (f"flow-matching SDE, noise level {self.noise_level} "
                f"(shared prefix: {prefix}, untrained suffix: {suffix})")

    def validation_errors(self) -> list[str]:
        if not (self.noise_level > 0 and math.isfinite(self.noise_level)):
            return [
                f"noise_level must be > 0, got {self.noise_level}: with noise_level = 0 the flow-matching step is "
                "the deterministic ODE and its transitions have no log-probability to optimise (0.7 is the usual "
                "value)."
            ]
        return []

    @property
    def deterministic(self) -> bool:
        return self.noise_level == 0

    def prefix_sampler(self) -> "FlowSDESampler":
        """The ODE for the shared prefix (the prefix is not trained, so any step is valid there), unless
        `prefix_sde` asks for the SDE."""
        return self if self.prefix_sde or self.deterministic else FlowSDESampler(0.0)

    def suffix_sampler(self) -> "FlowSDESampler":
        """The ODE for the unrecorded steps after a start-anchored interval, unless `suffix_sde` asks for the
        SDE."""
        return self if self.suffix_sde or self.deterministic else FlowSDESampler(0.0)

    # ------------------------------------------------------------------ the schedule

    def timesteps(self, scheduler, num_inference_steps: int, device, **schedule) -> torch.Tensor:
        """The schedule of `num_inference_steps` steps. A scheduler with a resolution-dependent shift
        (``use_dynamic_shifting``, as FLUX.1 and Qwen-Image ship) needs its ``mu`` in `schedule`: the model family
        computes it from the image size ([`~b2trl.models.ModelFamily.schedule_kwargs`])."""
        if scheduler.config.get("use_dynamic_shifting", False) and schedule.get("mu") is None:
            raise ValueError(
                "this scheduler shifts its schedule by the image's size (use_dynamic_shifting=True), so it needs "
                "mu: pass the model family's schedule_kwargs(pipe, num_inference_steps, image_size) to "
                "sampler.timesteps."
            )
        scheduler.set_timesteps(num_inference_steps, device=device, **schedule)
        return scheduler.timesteps

    def initial_noise_sigma(self, scheduler) -> float:
        return 1.0  # σ = 1 is pure noise: x = (1 − σ) x₀ + σ ε

    def timestep_batch(self, timestep, batch_size: int, device) -> torch.Tensor:
        """`timestep` as one float entry per row (the transformer takes ``σ · 1000``, not an index)."""
        return torch.full((batch_size,), float(timestep), device=device, dtype=torch.float32)

    def step_sigmas(self, scheduler, timestep: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """
        ``(σ, σ_next)`` for each row's `timestep` (float32, shape ``(B,)``), looked up in the scheduler's current
        schedule (set by [`FlowSDESampler.timesteps`] with the number of steps the transitions were sampled with).
        """
        schedule = scheduler.timesteps.to(device=device, dtype=torch.float32)
        sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        t = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
        found = torch.isclose(t[:, None], schedule[None, :], rtol=1e-5, atol=1e-4)
        if not found.any(dim=1).all():
            missing = t[~found.any(dim=1)][:3].tolist()
            raise ValueError(
                f"timesteps {missing} are not in the scheduler's schedule of {len(schedule)} steps; set it with "
                "sampler.timesteps(scheduler, num_inference_steps, device) using the number of steps the "
                "transitions were sampled with."
            )
        index = found.to(torch.int64).argmax(dim=1)  # the first match; schedule timesteps are distinct
        return sigmas[index], sigmas[index + 1]

    # ------------------------------------------------------------------ the step

    def mean_and_std(self, scheduler, model_output, timestep, sample) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's Gaussian in float32: its mean ``(B, ...)`` and standard deviation ``std_t·sqrt(−dt)``
        (shape ``(B, 1, ...)``)."""
        sigma, sigma_next = self.step_sigmas(scheduler, timestep, sample.device)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        sigma, sigma_next = sigma.reshape(shape), sigma_next.reshape(shape)
        dt = sigma_next - sigma
        x, v = sample.to(torch.float32), model_output.to(torch.float32)
        # at σ = 1 the SDE's noise scale divides by zero; take the schedule's next sigma in the denominator there
        sigma_max = scheduler.sigmas[1].item() if len(scheduler.sigmas) > 1 else 0.0
        denominator = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_max), sigma)
        std_t = self.noise_level * torch.sqrt(sigma / denominator)
        variance_t = std_t**2
        mean = x * (1 + variance_t / (2 * sigma) * dt) + v * (1 + variance_t * (1 - sigma) / (2 * sigma)) * dt
        return mean, std_t * torch.sqrt(-dt)

    def ode_step(self, scheduler, model_output, timestep, sample) -> torch.Tensor:
        """The deterministic Euler step ``x + dt·v`` (float32 arithmetic, in `sample`'s dtype), as
        `FlowMatchEulerDiscreteScheduler.step` takes it."""
        sigma, sigma_next = self.step_sigmas(scheduler, timestep, sample.device)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        dt = (sigma_next - sigma).reshape(shape)
        return (sample.to(torch.float32) + dt * model_output).to(sample.dtype)

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
        if self.deterministic:
            out = self.ode_step(scheduler, model_output, timestep, sample) if prev_sample is None else prev_sample
            return StepOutput(out, torch.full((sample.shape[0],), float("nan"), device=sample.device))
        mean, std = self.mean_and_std(scheduler, model_output, timestep, sample)
        if prev_sample is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            # stored in the latents' dtype; the log-probability is of the stored value, so a recomputation matches
            prev_sample = (mean + std * noise).to(sample.dtype)
        log_prob = -((prev_sample.to(torch.float32) - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
        return StepOutput(prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))))
