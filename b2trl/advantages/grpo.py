"""Group-relative advantages (GRPO, as Flow-GRPO, DanceGRPO and MixGRPO use them): each prompt's samples of the
stage normalised by their own mean, ``A = (r - mean_prompt) / (std + 1e-4)``, with no reward history."""

from __future__ import annotations

import numpy as np

from .base import AdvantageRule, Advantages, StageRewards, clip_advantages, register_rule

EPS = 1e-4  # Flow-GRPO's: added to the std, so a group whose samples all tie gets A = 0, not a division by zero
STD_MODES = ("group", "global")


def group_normalized(values: np.ndarray, prompts, std: str = "group", eps: float = EPS) -> np.ndarray:
    """
    ``(v - mean_prompt) / (std + eps)`` for every sample of a flat array `values`, where ``mean_prompt`` is the mean
    of the samples with the same prompt and ``std`` is theirs (`std="group"`) or that of every sample
    (`std="global"`, Flow-GRPO's ``global_std``). Population standard deviations; NaN values are left out of the
    statistics and stay NaN.
    """
    if std not in STD_MODES:
        raise ValueError(f"advantage_std must be one of {STD_MODES}, got {std!r}.")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    prompts = np.asarray(list(prompts), dtype=object)
    out = np.full_like(values, np.nan)
    valid = ~np.isnan(values)
    spread = float(np.std(values[valid])) if std == "global" and valid.any() else 0.0
    for prompt in dict.fromkeys(prompts.tolist()):
        rows = (prompts == prompt) & valid
        if not rows.any():
            continue
        group = values[rows]
        scale = group.std() if std == "group" else spread
        out[rows] = (group - group.mean()) / (scale + eps)
    return out


@register_rule
class GRPORule(AdvantageRule):
    """
    Group-relative advantages: each prompt's samples of the stage (its group of branches, pooled with any other
    group of the same prompt) normalised by their mean and the std that `advantage_std` names (``"group"``:
    theirs; ``"global"``: every sample's of the stage), ``A = (r - mean) / (std + 1e-4)``, clipped to
    ``train_adv_clip_max``. No reward history. Every sample with a nonzero advantage is trained.

    With `advantage_per_reward` and a composite reward, each part's rewards are normalised within their groups
    first, summed with the composite's weights, and the sum is normalised over the stage (the per-reward
    normalisation of Flow-Factory's ``gdpo`` mode), so no part drowns another by its scale.
    """

    name = "grpo"
    description = "group-relative: A = (r - mean of the prompt's group) / (std + 1e-4), no history (Flow-GRPO)"

    def __call__(self, stage: StageRewards) -> Advantages:
        config = self.config
        std = getattr(config, "advantage_std", "group")
        if getattr(config, "advantage_per_reward", False):
            scores = self.per_reward_scores(stage, std)
        else:
            scores = group_normalized(stage.rewards, stage.prompts, std)
        advantages = clip_advantages(scores, config.train_adv_clip_max)
        keep = advantages != 0
        return Advantages(scores.reshape(stage.rewards.shape), keep.reshape(stage.rewards.shape),
                          advantages.reshape(stage.rewards.shape))

    @staticmethod
    def per_reward_scores(stage: StageRewards, std: str) -> np.ndarray:
        if not stage.components:
            raise ValueError(
                "advantage_per_reward=True needs a reward made of parts (a CompositeReward, or any reward whose "
                "metadata has 'components'); this reward reported none. Turn advantage_per_reward off, or score "
                "with b2trl.rewards.CompositeReward."
            )
        total = np.zeros(stage.rewards.size)
        for name, values in stage.components.items():
            total = total + stage.weights.get(name, 1.0) * group_normalized(values, stage.prompts, std)
        valid = ~np.isnan(total) & ~np.isnan(stage.rewards.reshape(-1))
        out = np.full_like(total, np.nan)
        if valid.any():
            out[valid] = (total[valid] - total[valid].mean()) / (total[valid].std() + EPS)
        return out
