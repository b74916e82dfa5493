"""Per-prompt reward history: the z-scores of B²-DiffuRL's rules are taken against a prompt's recent stages."""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

import numpy as np


class PromptRewardHistory:
    """
    Rewards seen for each prompt over the current stage and the previous `history_stages` stages.

    [`PromptRewardHistory.update`] adds one stage's rewards and returns their z-scores against the pooled
    rewards of that prompt in the window (this stage included). TRL's `PerPromptStatTracker` keeps a fixed
    number of samples; this one keeps a fixed number of *stages*, as the method prescribes.

    NaN rewards (samples whose reward could not be computed) are left out of the statistics and get a NaN z.

    Args:
        history_stages (`int`):
            How many previous stages are pooled with the current one (reference: 8).
        eps (`float`, *optional*, defaults to `1e-6`):
            A prompt whose pooled standard deviation is below `eps` gets z = 0: its samples did not differ.
    """

    def __init__(self, history_stages: int, eps: float = 1e-6):
        if history_stages < 0:
            raise ValueError(f"history_stages must be >= 0, got {history_stages}.")
        self.history_stages = history_stages
        self.eps = eps
        self._stages: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Iterable[float]) -> np.ndarray:
        """Record one stage's `rewards` (one per prompt occurrence) and return their z-scores."""
        rewards = np.asarray(list(rewards) if not isinstance(rewards, np.ndarray) else rewards, dtype=np.float64)
        if rewards.ndim != 1 or len(prompts) != len(rewards):
            raise ValueError(f"got {len(prompts)} prompts for rewards of shape {rewards.shape}; they must match.")
        prompts = np.asarray(prompts, dtype=object)
        z = np.zeros_like(rewards)
        for prompt in dict.fromkeys(prompts.tolist()):
            rows = prompts == prompt
            window = self._stages.setdefault(prompt, deque(maxlen=self.history_stages + 1))
            window.append(rewards[rows][~np.isnan(rewards[rows])])
            pooled = np.concatenate(list(window))
            std = pooled.std() if pooled.size else 0.0
            z[rows] = 0.0 if std < self.eps else (rewards[rows] - pooled.mean()) / std
            z[rows & np.isnan(rewards)] = np.nan
        return z

    def stats(self) -> dict[str, tuple[float, float, int]]:
        """Mean, std and sample count of each prompt's pooled window."""
        out = {}
        for prompt, window in self._stages.items():
            pooled = np.concatenate(list(window))
            out[prompt] = (float(pooled.mean()), float(pooled.std()), int(pooled.size))
        return out

    def state_dict(self) -> dict:
        return {
            "history_stages": self.history_stages,
            "stages": {p: [w.tolist() for w in window] for p, window in self._stages.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._stages = {
            p: deque((np.asarray(w, dtype=np.float64) for w in windows), maxlen=self.history_stages + 1)
            for p, windows in state["stages"].items()
        }
