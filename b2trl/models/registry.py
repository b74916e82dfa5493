"""The model families b2trl knows, and how a pipeline is matched to one."""

from __future__ import annotations

from .base import ModelFamily
from .flux import FluxFamily
from .qwenimage import QwenImageFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily
from .zimage import ZImageFamily

# a new family is one module in this folder and one entry here
FAMILIES: tuple[ModelFamily, ...] = (
    StableDiffusionFamily(),
    StableDiffusionXLFamily(),
    StableDiffusion3Family(),
    FluxFamily(),
    QwenImageFamily(),
    ZImageFamily(),
)


def family_for_class(class_name: str, model: str = "the model") -> ModelFamily:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``)."""
    for family in FAMILIES:
        if family.matches(class_name):
            return family
    supported = ", ".join(f.pipeline_class_name for f in FAMILIES)
    raise ValueError(f"{model} is a {class_name or 'pipeline of unknown class'}; b2trl trains {supported}.")


def family_for_pipeline(pipeline) -> ModelFamily:
    """
    The family of a pipeline: a [`~b2trl.models.TrainingPipeline`]'s own, else the family of the diffusers
    pipeline it holds (a TRL `DDPOStableDiffusionPipeline`'s ``sd_pipeline``) or of `pipeline` itself.
    """
    family = getattr(pipeline, "__dict__", {}).get("family")
    if family is not None:
        return family
    inner = getattr(pipeline, "sd_pipeline", pipeline)
    for cls in type(inner).__mro__:
        for family in FAMILIES:
            if family.matches(cls.__name__):
                return family
    return family_for_class(type(inner).__name__, type(inner).__name__)
