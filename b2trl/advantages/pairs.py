"""Zero-sum pairs: each group's best and worst branch together, with advantages ``±gap/2``."""

from __future__ import annotations

import numpy as np

from .base import Advantages, StageRewards, register_rule
from .best_worst import best_and_worst
from .zscores import ZScoreRule


def select_pairs(z: np.ndarray, min_gap: float) -> np.ndarray:
    """
    Keep each group's best *and* worst branch together, if their z-scores differ by at least `min_gap`.

    Unlike best/worst selection, a group contributes a pair or nothing, so the kept samples can be given
    advantages that sum to zero per group (see [`pair_advantages`]).

    Returns:
        A boolean mask of the ``(groups, branches)`` shape of `z`.
    """
    z, rows, best, worst = best_and_worst(z)
    keep = np.zeros(z.shape, dtype=bool)
    gap = z[rows, best] - z[rows, worst]  # NaN when a group has no valid sample
    paired = (gap >= min_gap) & (best != worst)
    keep[rows[paired], best[paired]] = True
    keep[rows[paired], worst[paired]] = True
    return keep


def kept_pairs(z: np.ndarray, keep: np.ndarray) -> list[tuple[int, int, int]]:
    """``(group, best, worst)`` of every group with kept samples: its highest and lowest kept branch by `z`."""
    z = np.asarray(z, dtype=np.float64)
    found = []
    for g in np.flatnonzero(keep.any(axis=1)):
        members = np.flatnonzero(keep[g])
        found.append((int(g), int(members[np.argmax(z[g, members])]), int(members[np.argmin(z[g, members])])))
    return found


def pair_advantages(z: np.ndarray, keep: np.ndarray, clip: float) -> np.ndarray:
    """
    Advantages for [`select_pairs`]: the kept best branch gets ``+gap/2`` and the kept worst ``-gap/2``, where
    ``gap`` is their z-score difference, clipped to ``[-clip, clip]``; every other sample gets 0.
    """
    z = np.asarray(z, dtype=np.float64)
    adv = np.zeros(z.shape)
    for g, hi, lo in kept_pairs(z, keep):
        half = min((z[g, hi] - z[g, lo]) / 2, clip)
        adv[g, hi], adv[g, lo] = half, -half
    return adv


@register_rule
class PairsRule(ZScoreRule):
    """Keep a group's best and worst branch together when their z-scores differ by at least
    ``selection_threshold_best - selection_threshold_worst``; advantages ``±gap/2`` (zero-sum per group)."""

    name = "pairs"
    pairs = True
    description = "each group's best and worst branch together, zero-sum advantages ±gap/2 (for skewed rewards)"

    def __call__(self, stage: StageRewards) -> Advantages:
        config = self.config
        z = self.z_scores(stage)
        keep = select_pairs(z, config.selection_threshold_best - config.selection_threshold_worst)
        return Advantages(z, keep, pair_advantages(z, keep, config.train_adv_clip_max))
