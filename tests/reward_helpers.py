"""Helpers for the reward tests: user-style rewards for `module:function` lookups, tiny CLIP models."""

import torch

from b2trl.rewards.testing import build_tiny_clip, image_processor_class, save_aesthetic_head  # noqa: F401


def brightness_reward(images, prompts, prompt_metadata):
    """A user reward: mean pixel value."""
    return images.float().mean(dim=(1, 2, 3)), {}


def prompt_length_reward(images, prompts, prompt_metadata, scale=1.0):
    """A user reward returning a plain list (not a tensor), with a keyword argument."""
    return [scale * len(p) for p in prompts], {"unit": "characters"}


class ConstantReward:
    """A user reward class, instantiated by `get_reward("module:ConstantReward", value=...)`."""

    def __init__(self, value=1.0):
        self.value = value

    def __call__(self, images, prompts, prompt_metadata):
        return torch.full((images.shape[0],), float(self.value), device=images.device), {}

