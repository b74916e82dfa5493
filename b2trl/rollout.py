"""Branch-based sampling: one shared prefix per prompt, then N branches finished independently.

The rollout is one linear function, like a diffusers pipeline's ``__call__``: prefix, fork, interval, suffix,
decode. Only the interval's steps (from the branch point to the interval's end) are recorded, in the layout TRL's
DDPO trainer trains on; the suffix (empty for B²'s backward interval) finishes each branch unrecorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .models import Conditioning, family_for_pipeline
from .samplers import Sampler
from .stage import SampleBatch


@dataclass
class BranchRollout:
    """
    What one branch rollout produced. Rows are grouped by prompt: rows ``g*N .. g*N + N - 1`` are the
    `num_branches` branches of prompt ``g``.

    Attributes:
        images: ``(B*N, 3, H, W)`` decoded images in ``[0, 1]``.
        latents: ``(B*N, L, C, h, w)`` latent before each interval step.
        next_latents: ``(B*N, L, C, h, w)`` latent after each interval step.
        log_probs: ``(B*N, L)`` log-probability of each interval transition under the sampling policy.
        timesteps: ``(B*N, L)`` scheduler timestep of each interval step.
        branch_latents: ``(B, C, h, w)`` the shared latent at the branch point, one per prompt (``(B*N, ...)``,
            one per branch, when every branch drew its own initial noise).
        num_branches: ``N``.
        denoiser_rows: rows the denoiser evaluated (one sample at one step; two with guidance).

    ``L`` is the interval's length: ``interval_end - branch_point``.
    """

    images: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    branch_latents: torch.Tensor
    num_branches: int
    denoiser_rows: int = 0

    def transitions(self, conditioning: Conditioning) -> dict[str, torch.Tensor]:
        """The recorded interval as a DDPO-layout sample dict, with each prompt's conditioning (one row per
        prompt) repeated for its branches under ``cond.*`` keys. The unconditional half of guidance is the same for
        every row and is not stored here (the trainer holds it once)."""
        return {
            **Conditioning(conditioning.cond).repeat_interleave(self.num_branches).to_rows(),
            "timesteps": self.timesteps,
            "latents": self.latents,
            "next_latents": self.next_latents,
            "log_probs": self.log_probs,
        }

    def sample_batch(self, prompts, prompt_metadata) -> SampleBatch:
        """The images with each prompt and its metadata repeated for its branches, for the reward function."""
        n = self.num_branches
        repeated_prompts = tuple(p for p in prompts for _ in range(n))
        return SampleBatch([self.images, repeated_prompts, tuple(m for m in prompt_metadata for _ in range(n))])


def _chunks(total: int, size: Optional[int]):
    size = total if not size else size
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


@torch.no_grad()
def _denoise(pipeline, family, sampler, latents, conditioning, timesteps, *, guidance_scale, generator, record):
    """Run `timesteps` on `latents`; return the final latents and, if `record`, the transitions."""
    denoiser = getattr(pipeline, family.denoiser_name)
    trajectory, log_probs = [latents], []
    for t in timesteps:
        t_batch = sampler.timestep_batch(t, latents.shape[0], latents.device)
        prediction = family.predict(denoiser, latents, t_batch, conditioning, guidance_scale)
        out = sampler.step(pipeline.scheduler, prediction, t_batch, latents, generator=generator)
        latents = out.prev_sample
        if record:
            trajectory.append(latents)
            log_probs.append(out.log_prob)
    if not record:
        return latents, None, None
    return latents, torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)


def _rows(latents, conditioning, timesteps) -> int:
    """Denoiser rows of running `timesteps` on `latents` (guidance doubles them)."""
    return latents.shape[0] * len(timesteps) * (2 if conditioning.guided else 1)


@torch.no_grad()
def decode_latents(pipeline, latents: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Decode latents to images in ``[0, 1]`` (float32), `chunk_size` rows at a time."""
    family = family_for_pipeline(pipeline)
    return torch.cat([family.decode(pipeline, latents[rows]) for rows in _chunks(latents.shape[0], chunk_size)])


@torch.no_grad()
def branch_rollout(
    pipeline,
    conditioning: Conditioning,
    *,
    sampler: Sampler,
    num_inference_steps: int,
    branch_point: int,
    num_branches: int,
    guidance_scale: float = 5.0,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    latents: Optional[torch.Tensor] = None,
    image_size: Optional[tuple[int, int]] = None,
    prefix_sampler: Optional[Sampler] = None,
    interval_end: Optional[int] = None,
    suffix_sampler: Optional[Sampler] = None,
    independent_noise: bool = False,
) -> BranchRollout:
    """
    Sample `num_branches` images per prompt that share their first `branch_point` denoising steps, recording the
    steps ``[branch_point, interval_end)``.

    Args:
        pipeline ([`~b2trl.models.TrainingPipeline`] or a TRL `DDPOStableDiffusionPipeline`):
            The pipeline; its model family provides the denoiser call, latent shape and decoding.
        conditioning ([`~b2trl.models.Conditioning`]):
            One row per prompt; with an unconditional half, sampling uses classifier-free guidance.
        sampler ([`~b2trl.samplers.Sampler`]): the stochastic step and its log-probability.
        num_inference_steps (`int`): ``T``.
        branch_point (`int`): steps ``[0, branch_point)`` form the shared prefix; the interval starts here.
        num_branches (`int`): ``N``, copies of the branch-point latent finished with independent noise.
        guidance_scale (`float`): classifier-free guidance scale.
        chunk_size (`int`, *optional*): at most this many rows per denoiser/VAE call, to bound memory.
        generator (`torch.Generator`, *optional*): source of the initial noise and of every step's noise.
        latents (`torch.Tensor`, *optional*): ``(B, C, h, w)`` initial noise, drawn if not given.
        image_size (`tuple[int, int]`, *optional*): ``(height, width)`` in pixels of the images (of the drawn
            noise, and for a flow model the size its resolution-dependent shift is computed for; must match
            `latents` when both are given); defaults to the model's own size.
        prefix_sampler ([`~b2trl.samplers.Sampler`], *optional*): the step of the shared prefix, which is not
            recorded; defaults to ``sampler.prefix_sampler()`` (the sampler itself, or e.g. a flow model's ODE).
        interval_end (`int`, *optional*): the first step after the interval; defaults to ``T`` (B²'s backward
            interval). Steps ``[interval_end, T)`` are the suffix: each branch finished, nothing recorded.
        suffix_sampler ([`~b2trl.samplers.Sampler`], *optional*): the step of the suffix; defaults to
            ``sampler.suffix_sampler()`` (the sampler itself, or e.g. a flow model's ODE).
        independent_noise (`bool`, *optional*, defaults to `False`): every branch draws its own initial noise
            and runs its own prefix (``B*N`` rows) instead of sharing the prompt's: a group is then the prompt's
            independent samples (Flow-GRPO's groups). `latents`, if given, has ``B*N`` rows.

    Returns:
        [`BranchRollout`]
    """
    if not 0 <= branch_point < num_inference_steps:
        raise ValueError(f"branch_point must be in [0, {num_inference_steps}), got {branch_point}.")
    interval_end = num_inference_steps if interval_end is None else interval_end
    if not branch_point < interval_end <= num_inference_steps:
        raise ValueError(
            f"interval_end must be in ({branch_point}, {num_inference_steps}] (after branch_point, at most the number "
            f"of steps), got {interval_end}."
        )
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}.")
    family = family_for_pipeline(pipeline)
    denoiser, scheduler = getattr(pipeline, family.denoiser_name), pipeline.scheduler
    if independent_noise:
        # each branch is its own trajectory from the first step: repeat the prompts, then fork into one copy each
        conditioning, forks = conditioning.repeat_interleave(num_branches), 1
    else:
        forks = num_branches
    batch = len(conditioning)
    device = next(iter(conditioning.cond.values())).device
    # sizes come from the diffusers pipeline itself: TRL's wrapper does not forward e.g. its vae_scale_factor
    pipe = getattr(pipeline, "sd_pipeline", pipeline)
    image_size = image_size or family.image_size(pipe)
    schedule = family.schedule_kwargs(pipe, num_inference_steps, image_size)
    timesteps = sampler.timesteps(scheduler, num_inference_steps, device, **schedule)
    if latents is None:
        shape = family.latent_shape(pipe, batch, image_size)
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        latents = (noise * sampler.initial_noise_sigma(scheduler)).to(denoiser.dtype)
    denoise = dict(guidance_scale=guidance_scale, generator=generator)
    if prefix_sampler is None:
        prefix_sampler = sampler.prefix_sampler()
    if suffix_sampler is None:
        suffix_sampler = sampler.suffix_sampler()

    # 1. prefix: once per prompt, nothing recorded (it is not trained)
    prefix, rows_run = [], 0
    for rows in _chunks(batch, chunk_size):
        out, _, _ = _denoise(
            pipeline, family, prefix_sampler, latents[rows], conditioning.index(rows), timesteps[:branch_point],
            record=False, **denoise,
        )
        prefix.append(out)
        rows_run += _rows(out, conditioning, timesteps[:branch_point])
    branch_latents = torch.cat(prefix)

    # 2. fork: bit-identical copies of the branch-point latent, grouped by prompt
    forked = branch_latents.repeat_interleave(forks, dim=0)
    branched = conditioning.repeat_interleave(forks)

    # 3. the interval: every branch with its own noise, its transitions recorded
    # 4. the suffix (start-anchored intervals only): each branch finished, nothing recorded (it is not trained)
    interval, suffix = timesteps[branch_point:interval_end], timesteps[interval_end:]
    finals, trajectories, log_probs = [], [], []
    for rows in _chunks(forked.shape[0], chunk_size):
        rows_conditioning = branched.index(rows)
        final, trajectory, logp = _denoise(
            pipeline, family, sampler, forked[rows], rows_conditioning, interval, record=True, **denoise,
        )
        rows_run += _rows(final, rows_conditioning, interval) + _rows(final, rows_conditioning, suffix)
        if len(suffix):
            final, _, _ = _denoise(
                pipeline, family, suffix_sampler, final, rows_conditioning, suffix, record=False, **denoise,
            )
        finals.append(final)
        trajectories.append(trajectory)
        log_probs.append(logp)
    trajectory = torch.cat(trajectories)

    # 5. decode
    images = decode_latents(pipeline, torch.cat(finals), chunk_size)
    return BranchRollout(
        images=images,
        latents=trajectory[:, :-1],
        next_latents=trajectory[:, 1:],
        log_probs=torch.cat(log_probs),
        timesteps=interval.unsqueeze(0).repeat(forked.shape[0], 1),
        branch_latents=branch_latents,
        num_branches=num_branches,
        denoiser_rows=rows_run,
    )
