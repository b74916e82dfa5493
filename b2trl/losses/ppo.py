"""PPO-clip on per-sample advantages (DDPO's loss, and B²-DiffuRL's)."""

from __future__ import annotations

import torch

from .base import LossOutput, TrainingLoss, register_loss


@register_loss
class PPOClipLoss(TrainingLoss):
    """
    ``mean(max(-A·r, -A·clip(r, 1-ε, 1+ε)))`` with ``r = exp(log π_θ - log π_old)``.

    Args:
        clip_range (`float`): ε (`train_clip_range`).
        adv_clip_max (`float`): advantages are clipped to ``[-adv_clip_max, adv_clip_max]`` (`train_adv_clip_max`).
    """

    name = "ppo"

    def __init__(self, clip_range: float, adv_clip_max: float):
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max

    @classmethod
    def from_config(cls, config) -> "PPOClipLoss":
        return cls(config.train_clip_range, config.train_adv_clip_max)

    def describe(self) -> str:
        return f"PPO-clip on the kept samples' advantages, clip range {self.clip_range}"

    def __call__(self, log_prob, batch) -> LossOutput:
        old = batch["log_probs"]
        advantages = torch.clamp(batch["advantages"], -self.adv_clip_max, self.adv_clip_max)
        ratio = torch.exp(log_prob - old)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - self.clip_range, 1.0 + self.clip_range)
        loss = torch.mean(torch.maximum(unclipped, clipped))
        stats = {
            "approx_kl": 0.5 * torch.mean((log_prob - old) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > self.clip_range).float()),
        }
        return LossOutput(loss, stats)
