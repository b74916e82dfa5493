"""The rules of B²-DiffuRL: rewards z-scored per prompt over the current and the last `history_stages` stages."""

from __future__ import annotations

import numpy as np

from .base import AdvantageRule, StageRewards
from .history import PromptRewardHistory


class ZScoreRule(AdvantageRule):
    """
    Base of the rules that score a sample by its per-prompt z-score against the rewards that prompt got in this
    stage and the previous `history_stages` stages ([`~b2trl.advantages.history.PromptRewardHistory`]). The history is
    part of a checkpoint.
    """

    def __init__(self, config):
        super().__init__(config)
        self.history = PromptRewardHistory(config.history_stages)

    def z_scores(self, stage: StageRewards) -> np.ndarray:
        """This stage's per-prompt z-scores, ``(groups, branches)`` (the history is updated)."""
        return self.history.update(list(stage.prompts), stage.rewards.reshape(-1)).reshape(stage.rewards.shape)

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state["history"])
