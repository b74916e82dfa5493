"""Training losses over recorded transitions. One module per member; `build_loss` picks it from the config."""

from .base import LossOutput, TrainingLoss
from .dpo import DPOPairLoss
from .ppo import PPOClipLoss

LOSS_TYPES = ("ppo", "dpo")


def build_loss(config) -> TrainingLoss:
    """The loss `config.loss_type` names, with its settings from the config."""
    loss_type = getattr(config, "loss_type", "ppo")
    if loss_type == "ppo":
        return PPOClipLoss(config.train_clip_range, config.train_adv_clip_max)
    if loss_type == "dpo":
        return DPOPairLoss(config.dpo_beta, config.train_clip_range)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")


__all__ = ["LOSS_TYPES", "DPOPairLoss", "LossOutput", "PPOClipLoss", "TrainingLoss", "build_loss"]
