"""A DPO-style loss on (winner, loser) pairs of trajectories (D3PO), against a frozen reference policy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossOutput, TrainingLoss, register_loss


@register_loss
class DPOPairLoss(TrainingLoss):
    """
    ``-log σ(β · (log r_w - log r_l))`` per interval step of a pair, with ``r = clamp(π_θ / π_ref, 1 - ε, 1 + ε)``
    on the transition's probabilities.

    Rows come in pairs: row ``2i`` is the winner (the better branch of a group) and row ``2i + 1`` the loser,
    trained at the same interval step. The micro-batch carries ``ref_log_probs`` (the reference policy's
    log-probabilities of the same transitions) and ``row_weight`` (1 for a real pair, 0 for the padding pairs
    that keep processes in step).

    Args:
        beta (`float`): β (`dpo_beta`).
        clip_range (`float`): ε (`train_clip_range`).
    """

    name = "dpo"
    group_size = 2
    needs_reference = True
    selection = "pairs"

    def __init__(self, beta: float, clip_range: float):
        self.beta = beta
        self.clip_range = clip_range

    @classmethod
    def from_config(cls, config) -> "DPOPairLoss":
        return cls(config.dpo_beta, config.train_clip_range)

    def describe(self) -> str:
        return (f"D3PO-style DPO on each kept group's (best, worst) pair against the base model, beta {self.beta}, "
                f"ratio clip {self.clip_range}")

    def __call__(self, log_prob, batch) -> LossOutput:
        ratio = torch.exp(log_prob - batch["ref_log_probs"])
        log_ratio = torch.log(torch.clamp(ratio, 1.0 - self.clip_range, 1.0 + self.clip_range))
        margin = self.beta * (log_ratio[0::2] - log_ratio[1::2])
        weight = batch["row_weight"][0::2]
        loss = torch.mean(-F.logsigmoid(margin) * weight)
        pairs = weight.sum()
        detached = margin.detach()
        stats = {
            "dpo_margin": (detached * weight).sum() / pairs.clamp(min=1),
            "dpo_accuracy": ((detached > 0).float() * weight).sum() / pairs.clamp(min=1),
        }
        return LossOutput(loss, stats, weights={"dpo_margin": pairs, "dpo_accuracy": pairs})
