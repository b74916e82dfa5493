"""B²-DiffuRL's selection: per group, the best branch if it stands out upwards, the worst if it stands out
downwards; each kept sample's advantage is its z-score."""

from __future__ import annotations

import numpy as np

from .base import Advantages, StageRewards, clip_advantages, register_rule
from .zscores import ZScoreRule


def best_and_worst(z):
    """`z` as a float array, its group indices, and each group's best and worst branch (NaN never wins)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must have shape (groups, branches), got {z.shape}.")
    missing = np.isnan(z)
    best = np.where(missing, -np.inf, z).argmax(axis=1)
    worst = np.where(missing, np.inf, z).argmin(axis=1)
    return z, np.arange(z.shape[0]), best, worst


def select_best_worst(z: np.ndarray, threshold_best: float, threshold_worst: float) -> np.ndarray:
    """
    The B²-DiffuRL selection rule on a ``(groups, branches)`` array of z-scores.

    In each group the best branch is kept if its z >= `threshold_best` and the worst branch if its
    z < `threshold_worst`; every other branch is dropped. A group whose branches barely differ keeps nothing.
    NaN z-scores (dropped samples) are never kept.

    Returns:
        A boolean mask of the same shape: `True` for kept samples.
    """
    z, rows, best, worst = best_and_worst(z)
    keep = np.zeros(z.shape, dtype=bool)
    keep[rows, best] = z[rows, best] >= threshold_best  # False for NaN
    keep[rows, worst] |= z[rows, worst] < threshold_worst
    return keep


@register_rule
class BestWorstRule(ZScoreRule):
    """Keep a group's best branch if ``z >= selection_threshold_best`` and its worst if
    ``z < selection_threshold_worst``; advantage = z, clipped to ``train_adv_clip_max`` (the paper's rule)."""

    name = "best_worst"
    description = "B²-DiffuRL: each group's best/worst branch when its per-prompt z-score stands out; A = z"

    def __call__(self, stage: StageRewards) -> Advantages:
        config = self.config
        z = self.z_scores(stage)
        keep = select_best_worst(z, config.selection_threshold_best, config.selection_threshold_worst)
        return Advantages(z, keep, np.where(keep, clip_advantages(z, config.train_adv_clip_max), 0.0))
