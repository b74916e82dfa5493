"""Rewards whose values the evaluation and collapse-guard tests control."""

import torch

from b2trl.rewards import register_reward


class ScriptedReward:
    """An evaluation reward whose value at its k-th call is ``values[k]`` for every image (the last value
    repeats): with one evaluation seed, the k-th evaluation scores ``values[k]``."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, images, prompts, prompt_metadata):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return torch.full((images.shape[0],), float(value)), {}


def scripted_eval_reward(values, name: str = "scripted") -> ScriptedReward:
    """A [`ScriptedReward`] registered as `name` for ``eval_rewards=[name]`` (logged as ``eval/<name>``)."""
    reward = ScriptedReward(values)
    register_reward(name, overwrite=True)(reward)
    return reward


def skewed_reward(num_branches: int):
    """A training reward that fails the darkest branch of every group (0) and passes the others (1). With 6 or
    more branches the passing ones sit below a z-score of +0.5, so best/worst selection keeps only failures and
    the skew watch fires after its third stage."""

    def reward(images, prompts, prompt_metadata):
        brightness = images.float().mean(dim=(1, 2, 3)).reshape(-1, num_branches)
        failed = brightness == brightness.min(dim=1, keepdim=True).values
        return torch.where(failed, 0.0, 1.0).reshape(-1), {}

    return reward
