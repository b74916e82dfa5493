"""What a training loss receives and returns: one micro-batch of recorded transitions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """
    The loss of one micro-batch and its statistics.

    Attributes:
        loss: a scalar, the mean over the micro-batch's transitions.
        stats: scalar tensors to average over the stage and log (e.g. ``approx_kl``, ``clipfrac``).
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingLoss:
    """
    A policy-gradient loss over transitions: the member of the loss seam.

    The trainer computes the current policy's log-probability of each transition of a micro-batch and calls the
    loss with it and the micro-batch (a dict of tensors, one row per transition: ``log_probs`` recorded while
    sampling, ``advantages``, ``timesteps``, ...). A new loss is one module in ``b2trl/losses/``.

    Class attributes:
        name: the value of `B2DiffuRLConfig.loss_type` that selects it.
        group_size: rows that must stay together in a micro-batch and be trained at the same interval step
            (2 for a loss over (winner, loser) pairs).
    """

    name: str = ""
    group_size: int = 1

    def __call__(self, log_prob: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError
