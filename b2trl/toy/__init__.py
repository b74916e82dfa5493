"""A procedural text-to-image world where prompt–image alignment is measured exactly.

32×32 pictures of coloured circles, squares and triangles, described by one-object, two-object (attribute
binding) and object–relation–object prompts; an exact pixel-level alignment reward; a tiny pretrained
``StableDiffusionPipeline`` that draws them imperfectly; and an evaluation helper. See ``docs/toy_world.md``.

Importing this package is light (numpy and torch); diffusers is only imported by the functions that need it.
"""

import os
from typing import Optional

from .reward import alignment_reward, alignment_reward_with_components
from .world import COLOURS, PALETTE, SHAPES, TEMPLATES, heldout_prompts, is_heldout, parse_prompt, render, train_prompts

# The shipped pretrained toy pipelines, by the name a command line takes (`--pretrained_model toy`): name -> the
# kind `model_path` takes. The one map of these names; the folders are `model_path`'s business.
TOY_MODELS = {"toy": "sd", "toy-sd3": "sd3"}
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


def toy_model_kind(name_or_path: Optional[str]) -> Optional[str]:
    """The kind (``"sd"``, ``"sd3"``) of the shipped toy model that `name_or_path` names (``"toy"``, ``"toy-sd3"``)
    or locates (its folder), else `None`."""
    if not name_or_path:
        return None
    if name_or_path in TOY_MODELS:
        return TOY_MODELS[name_or_path]
    where = os.path.realpath(os.path.expanduser(name_or_path))
    for kind in _MODEL_FOLDERS:
        if where == os.path.realpath(model_path(kind)):
            return kind
    return None


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
    "TOY_MODELS",
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
    "toy_model_kind",
    "train_prompts",
]
