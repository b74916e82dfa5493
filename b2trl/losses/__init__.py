"""Training losses over recorded transitions. One module per member, registered by name (`loss_type`)."""

from .base import LOSSES, LossOutput, TrainingLoss, register_loss
from .dpo import DPOPairLoss
from .ppo import PPOClipLoss

LOSS_TYPES = tuple(LOSSES)


def build_loss(config) -> TrainingLoss:
    """The loss `config.loss_type` names, with its settings from the config."""
    loss_type = getattr(config, "loss_type", "ppo")
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    return LOSSES[loss_type].from_config(config)


__all__ = ["LOSSES", "LOSS_TYPES", "DPOPairLoss", "LossOutput", "PPOClipLoss", "TrainingLoss", "build_loss",
           "register_loss"]
