"""A procedural text-to-image world where prompt–image alignment is measured exactly.

32×32 pictures of coloured circles, squares and triangles, described by one-object, two-object (attribute
binding) and object–relation–object prompts; an exact pixel-level alignment reward; a tiny pretrained
``StableDiffusionPipeline`` that draws them imperfectly; and an evaluation helper. See ``docs/toy_world.md``.

Importing this package is light (numpy and torch); diffusers is only imported by the functions that need it.
"""

import os

from .reward import alignment_reward, alignment_reward_with_components
from .world import COLOURS, PALETTE, SHAPES, TEMPLATES, heldout_prompts, is_heldout, parse_prompt, render, train_prompts


def model_path() -> str:
    """Local folder of the shipped pretrained toy pipeline (``StableDiffusionPipeline.save_pretrained`` layout)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


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
