"""No selection: every sample trained with its per-prompt z-score (DDPO's per-prompt statistics)."""

from __future__ import annotations

import numpy as np

from .base import Advantages, StageRewards, clip_advantages, register_rule
from .zscores import ZScoreRule


@register_rule
class AllRule(ZScoreRule):
    """Train every sample (whose reward is known) with its per-prompt z-score, clipped to ``train_adv_clip_max``."""

    name = "all"
    description = "every sample, A = per-prompt z-score over the history (DDPO-style; with branches, an ablation)"

    def __call__(self, stage: StageRewards) -> Advantages:
        z = self.z_scores(stage)
        keep = ~np.isnan(z)
        return Advantages(z, keep, np.where(keep, clip_advantages(z, self.config.train_adv_clip_max), 0.0))
