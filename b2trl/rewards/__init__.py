"""Reward functions in TRL's DDPO protocol: `(images, prompts, prompt_metadata) -> (rewards, metadata)`.

`images` is a `(B, 3, H, W)` tensor in `[0, 1]` (any device/dtype); `rewards` comes back as a float32
`(B,)` tensor on the images' device. Scorers with several parts return a metadata dict with a
`"components"` entry (`{part: float32 (B,) tensor}`), which the trainer logs as `reward/<part>`.

The model-based scorers (and transformers) are imported only when first used, so importing this package is cheap.
"""

from .registry import get_reward, list_rewards, register_reward

_LAZY = {
    "CompositeReward": "b2trl.rewards.composite",
    "JpegCompressibility": "b2trl.rewards.jpeg",
    "JpegIncompressibility": "b2trl.rewards.jpeg",
    "AestheticScorer": "b2trl.rewards.clip",
    "CLIPScore": "b2trl.rewards.clip",
    "PickScore": "b2trl.rewards.clip",
    "HPSv2": "b2trl.rewards.hps",
    "VQAScore": "b2trl.rewards.vqa",
    "RemoteReward": "b2trl.rewards.remote",
    "RemoteRewardError": "b2trl.rewards.remote",
    "RemoteRewardTimeout": "b2trl.rewards.remote",
    "RemoteRewardUnreachable": "b2trl.rewards.remote",
    "RewardModelNotFoundError": "b2trl.rewards.base",
}

__all__ = ["get_reward", "list_rewards", "register_reward", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'b2trl.rewards' has no attribute {name!r}")


def __dir__():
    return __all__
