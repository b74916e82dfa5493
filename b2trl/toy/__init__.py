"""A procedural text-to-image world where prompt–image alignment is measured exactly.

32×32 pictures of coloured circles, squares and triangles, described by one-object, two-object (attribute
binding) and object–relation–object prompts; an exact pixel-level alignment reward; a tiny pretrained
``StableDiffusionPipeline`` that draws them imperfectly; and an evaluation helper. See ``docs/toy_world.md``.

Importing this package is light (numpy and torch); diffusers is only imported by the functions that need it.
"""

import os

from .reward import alignment_reward, alignment_reward_with_components
from .world import COLOURS, PALETTE, SHAPES, TEMPLATES, heldout_prompts, is_heldout, parse_prompt, render, train_prompts

_MODEL_FOLDERS = {"sd": "model", "sd3": "model_sd3"}


def model_path(kind: str = "sd") -> str:
    """Local folder of a shipped pretrained toy pipeline (``save_pretrained`` layout).

    Args:
        kind (`str`, *optional*, defaults to `"sd"`): ``"sd"`` for the ``StableDiffusionPipeline`` (DDIM),
            ``"sd3"`` for the ``StableDiffusion3Pipeline`` (flow matching; sample it with
            ``max_sequence_length=16``, see its model card).
    """
    if kind not in _MODEL_FOLDERS:
        raise ValueError(f"unknown toy model kind {kind!r}; expected one of {sorted(_MODEL_FOLDERS)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _MODEL_FOLDERS[kind])


def __getattr__(name):
    if name in ("evaluate_alignment", "save_grid", "generate"):
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'b2trl.toy' has no attribute {name!r}")


__all__ = [
    "COLOURS",
    "PALETTE",
    "SHAPES",
    "TEMPLATES",
    "alignment_reward",
    "alignment_reward_with_components",
    "evaluate_alignment",
    "generate",
    "heldout_prompts",
    "is_heldout",
    "model_path",
    "parse_prompt",
    "render",
    "save_grid",
    "train_prompts",
]
