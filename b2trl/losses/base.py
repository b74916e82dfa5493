"""What a training loss receives and returns: one micro-batch of recorded transitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class LossOutput:
    """
    The loss of one micro-batch and its statistics.

    Attributes:
        loss: a scalar, the mean over the micro-batch's transitions.
        stats: scalar tensors to average over the stage and log (e.g. ``approx_kl``, ``clipfrac``).
        weights: for a statistic that is a mean over part of the micro-batch (e.g. the real pairs, not the
            padding), how many items it averages; the stage's value is then the weighted mean. Others weigh 1.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingLoss:
    """
    A policy-gradient loss over transitions: the member of the loss seam.

    The trainer computes the current policy's log-probability of each transition of a micro-batch and calls the
    loss with it and the micro-batch (a dict of tensors, one row per transition: ``log_probs`` recorded while
    sampling, ``advantages``, ``timesteps``, ``ref_log_probs`` when `needs_reference`, ...). A new loss is one
    module in ``b2trl/losses/`` with a class decorated by [`register_loss`], imported in the package, plus its test.

    Class attributes:
        name: the value of `B2DiffuRLConfig.loss_type` that selects it.
        group_size: rows that must stay together in a micro-batch and be trained at the same interval step
            (2 for a loss over (winner, loser) pairs).
        needs_reference: whether the micro-batch must carry ``ref_log_probs``, the reference policy's
            log-probabilities of its transitions.
        selection: the selection rule the loss needs (`None`: any). A loss over pairs needs ``"pairs"``, which
            keeps exactly each group's best and worst branch.
    """

    name: str = ""
    group_size: int = 1
    needs_reference: bool = False
    selection: Optional[str] = None

    @classmethod
    def from_config(cls, config) -> "TrainingLoss":
        """The loss with its settings read from a [`B2DiffuRLConfig`]."""
        raise NotImplementedError

    def __call__(self, log_prob: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for model cards and logs, e.g. ``"PPO-clip, clip range 0.1"``."""
        return self.name


LOSSES: dict[str, type[TrainingLoss]] = {}


def register_loss(cls: type[TrainingLoss]) -> type[TrainingLoss]:
    """Class decorator: make `cls` available as ``loss_type=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered.")
    LOSSES[cls.name] = cls
    return cls


class StageStatistics:
    """Weighted means of micro-batch statistics over a stage and over processes."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value, weight=1.0) -> None:
        value = torch.as_tensor(value).detach().float()
        weight = torch.as_tensor(weight, device=value.device).float()
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.counts[name] = self.counts.get(name, 0.0) + weight

    def add_output(self, out: LossOutput) -> None:
        self.add("loss", out.loss)
        for name, value in out.stats.items():
            self.add(name, value, out.weights.get(name, 1.0))

    def means(self, accelerator) -> dict[str, float]:
        """The means over every process (all processes must call this, with the same statistic names)."""
        sums = accelerator.reduce(dict(self.sums), reduction="sum")
        counts = accelerator.reduce(dict(self.counts), reduction="sum")
        return {k: float(sums[k] / counts[k].clamp(min=1e-12)) for k in sums}
