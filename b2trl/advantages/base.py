"""The advantage seam: how a stage's rewards become the samples that are trained and their advantages.

A rule sees every process's rewards of a stage as a ``(groups, branches)`` array (one group per prompt's
branches, prompt-major, branch-minor), the prompt of each sample, and, for a reward made of parts, each part's
rewards. It returns normalised scores, which samples are kept for training and their advantages. Rules are pure
NumPy (no torch, no accelerate), so each is unit-tested in milliseconds, and every process computes the same
result from the same gathered rewards.

A new rule is one module in ``b2trl/advantages/`` with a class decorated by [`register_rule`], imported in the
package's ``__init__``, plus its test; the trainer and the config find it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class StageRewards:
    """
    What a rule is given: every process's rewards of one stage.

    Attributes:
        rewards: ``(groups, branches)`` float64; NaN for a sample whose reward was dropped.
        prompts: one prompt per sample, in the same (flattened) order.
        components: for a composite reward, each part's ``(groups, branches)`` rewards (empty otherwise).
        weights: each part's weight in the composite (the reward's ``metadata["weights"]``).
    """

    rewards: np.ndarray
    prompts: Sequence[str]
    components: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.rewards = np.asarray(self.rewards, dtype=np.float64)
        if self.rewards.ndim != 2:
            raise ValueError(f"rewards must have shape (groups, branches), got {self.rewards.shape}.")
        if len(self.prompts) != self.rewards.size:
            raise ValueError(f"got {len(self.prompts)} prompts for {self.rewards.size} rewards; they must match.")


@dataclass
class Advantages:
    """
    What a rule returns, each a ``(groups, branches)`` array.

    Attributes:
        scores: the normalised rewards the rule decided on (per-prompt z-scores, group-normalised rewards).
        keep: `True` for the samples that are trained.
        advantages: each kept sample's advantage; 0 for the others.
    """

    scores: np.ndarray
    keep: np.ndarray
    advantages: np.ndarray


class AdvantageRule:
    """
    A selection/advantage rule: the member of the advantage seam (`B2DiffuRLConfig.selection_rule`).

    Built from the config (each rule reads its own settings); called once per stage with [`StageRewards`].

    Class attributes:
        name: the value of `selection_rule` that selects it.
        pairs: whether the kept samples of every group are exactly its best and its worst branch, so that they
            form a (winner, loser) pair — what a loss over pairs (DPO) needs.
        description: one line for `--help` and the docs.
    """

    name: str = ""
    pairs: bool = False
    description: str = ""

    def __init__(self, config):
        self.config = config

    def __call__(self, stage: StageRewards) -> Advantages:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint must hold for a resumed run to continue exactly (e.g. a reward history)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


RULES: dict[str, type[AdvantageRule]] = {}


def register_rule(cls: type[AdvantageRule]) -> type[AdvantageRule]:
    """Class decorator: make `cls` available as ``selection_rule=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered.")
    if cls.name in RULES and RULES[cls.name] is not cls:
        raise ValueError(f"an advantage rule named {cls.name!r} is already registered ({RULES[cls.name].__name__}).")
    RULES[cls.name] = cls
    return cls


def build_rule(config, name: Optional[str] = None) -> AdvantageRule:
    """The rule `name` (default: ``config.selection_rule``), built from `config`."""
    name = config.selection_rule if name is None else name
    if name not in RULES:
        raise ValueError(f"selection_rule must be one of {tuple(RULES)}, got {name!r}.")
    return RULES[name](config)


def clip_advantages(values: np.ndarray, clip: float) -> np.ndarray:
    """`values` clipped to ``[-clip, clip]``, NaN (a dropped sample) as 0."""
    return np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), -clip, clip)
