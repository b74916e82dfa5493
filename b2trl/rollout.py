"""Branch-based sampling: one shared prefix per prompt, then N branches finished independently.

The rollout is one linear function, like a diffusers pipeline's ``__call__``: prefix, fork, finish, record.
Only the interval's steps (after the branch point) are recorded, in the layout TRL's DDPO trainer trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


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
        branch_latents: ``(B, C, h, w)`` the shared latent at the branch point, one per prompt.
        num_branches: ``N``.
    """

    images: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    branch_latents: torch.Tensor
    num_branches: int


def guided_noise_prediction(unet, latents, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale):
    """UNet noise prediction, with classifier-free guidance when `negative_prompt_embeds` is given.

    The unconditional and conditional halves run as one batch (negative first, as TRL's loss expects).
    """
    if negative_prompt_embeds is None:
        return unet(latents, timestep, prompt_embeds).sample
    pred = unet(
        torch.cat([latents, latents]),
        torch.cat([timestep, timestep]),
        torch.cat([negative_prompt_embeds, prompt_embeds]),
    ).sample
    uncond, cond = pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _chunks(total: int, size: Optional[int]):
    size = total if not size else size
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


@torch.no_grad()
def _denoise(pipeline, latents, embeds, neg_embeds, timesteps, *, guidance_scale, eta, generator, record):
    """Run `timesteps` on `latents`; return the final latents and, if `record`, the transitions."""
    trajectory, log_probs = [latents], []
    for t in timesteps:
        t_batch = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
        noise = guided_noise_prediction(pipeline.unet, latents, t_batch, embeds, neg_embeds, guidance_scale)
        out = pipeline.scheduler_step(noise, t_batch, latents, eta=eta, generator=generator)
        latents = out.latents
        if record:
            trajectory.append(latents)
            log_probs.append(out.log_probs)
    if not record:
        return latents, None, None
    return latents, torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Decode latents to images in ``[0, 1]`` (float32), `chunk_size` rows at a time."""
    images = []
    for rows in _chunks(latents.shape[0], chunk_size):
        decoded = vae.decode(latents[rows].to(vae.dtype) / vae.config.scaling_factor).sample
        images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def latent_shape(unet, batch_size: int) -> tuple[int, ...]:
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, unet.config.in_channels, height, width)


@torch.no_grad()
def branch_rollout(
    pipeline,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: Optional[torch.Tensor],
    *,
    num_inference_steps: int,
    branch_point: int,
    num_branches: int,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    latents: Optional[torch.Tensor] = None,
) -> BranchRollout:
    """
    Sample `num_branches` images per prompt that share their first `branch_point` denoising steps.

    Args:
        pipeline ([`~trl.DDPOStableDiffusionPipeline`]):
            Provides `unet`, `vae`, `scheduler` (DDIM) and `scheduler_step` (a DDIM step that returns log-probs).
        prompt_embeds (`torch.Tensor`): ``(B, seq, dim)`` text embeddings, one row per prompt.
        negative_prompt_embeds (`torch.Tensor` or `None`):
            ``(B, seq, dim)`` unconditional embeddings; `None` disables classifier-free guidance.
        num_inference_steps (`int`): ``T``.
        branch_point (`int`): ``b = T - L``; steps ``[0, b)`` form the shared prefix, ``[b, T)`` the interval.
        num_branches (`int`): ``N``, copies of the branch-point latent finished with independent noise.
        guidance_scale (`float`): classifier-free guidance scale.
        eta (`float`): DDIM eta; must be > 0 for the transitions to have log-probs.
        chunk_size (`int`, *optional*): at most this many rows per UNet/VAE call, to bound memory.
        generator (`torch.Generator`, *optional*): source of the initial noise and of every step's noise.
        latents (`torch.Tensor`, *optional*): ``(B, C, h, w)`` initial noise, drawn if not given.

    Returns:
        [`BranchRollout`]
    """
    if not 0 <= branch_point < num_inference_steps:
        raise ValueError(f"branch_point must be in [0, {num_inference_steps}), got {branch_point}.")
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}.")
    unet, scheduler = pipeline.unet, pipeline.scheduler
    device, batch = prompt_embeds.device, prompt_embeds.shape[0]
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if latents is None:
        noise = torch.randn(latent_shape(unet, batch), generator=generator, device=device, dtype=torch.float32)
        latents = (noise * scheduler.init_noise_sigma).to(unet.dtype)
    denoise = dict(guidance_scale=guidance_scale, eta=eta, generator=generator)

    # 1. prefix: once per prompt, nothing recorded (it is not trained)
    prefix = []
    for rows in _chunks(batch, chunk_size):
        neg = None if negative_prompt_embeds is None else negative_prompt_embeds[rows]
        out, _, _ = _denoise(
            pipeline, latents[rows], prompt_embeds[rows], neg, timesteps[:branch_point], record=False, **denoise
        )
        prefix.append(out)
    branch_latents = torch.cat(prefix)

    # 2. fork: bit-identical copies of the branch-point latent, grouped by prompt
    forked = branch_latents.repeat_interleave(num_branches, dim=0)
    embeds = prompt_embeds.repeat_interleave(num_branches, dim=0)
    neg_embeds = None
    if negative_prompt_embeds is not None:
        neg_embeds = negative_prompt_embeds.repeat_interleave(num_branches, dim=0)

    # 3. finish every branch with its own noise, recording the interval's transitions
    finals, trajectories, log_probs = [], [], []
    for rows in _chunks(forked.shape[0], chunk_size):
        neg = None if neg_embeds is None else neg_embeds[rows]
        final, trajectory, logp = _denoise(
            pipeline, forked[rows], embeds[rows], neg, timesteps[branch_point:], record=True, **denoise
        )
        finals.append(final)
        trajectories.append(trajectory)
        log_probs.append(logp)
    trajectory = torch.cat(trajectories)
    interval = timesteps[branch_point:]

    # 4. decode
    images = decode_latents(pipeline.vae, torch.cat(finals), chunk_size)
    return BranchRollout(
        images=images,
        latents=trajectory[:, :-1],
        next_latents=trajectory[:, 1:],
        log_probs=torch.cat(log_probs),
        timesteps=interval.unsqueeze(0).repeat(forked.shape[0], 1),
        branch_latents=branch_latents,
        num_branches=num_branches,
    )
