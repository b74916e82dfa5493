"""Model families: what the trainer needs from each kind of diffusers pipeline.

A family ([`ModelFamily`]) encodes prompts into a [`Conditioning`], calls the denoiser with classifier-free
guidance, shapes and decodes latents, and saves or loads LoRA weights in diffusers' layout. Adding a family is
one module here and one entry in ``registry.FAMILIES``.
"""

from .base import Conditioning, ModelFamily
from .flux import FluxFamily
from .loading import load_pipeline, wrap_pipeline
from .pipeline import TrainingPipeline
from .qwenimage import QwenImageFamily
from .registry import FAMILIES, family_for_class, family_for_pipeline
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily
from .zimage import ZImageFamily

__all__ = [
    "FAMILIES",
    "Conditioning",
    "FluxFamily",
    "ModelFamily",
    "QwenImageFamily",
    "StableDiffusionFamily",
    "StableDiffusion3Family",
    "StableDiffusionXLFamily",
    "TrainingPipeline",
    "ZImageFamily",
    "family_for_class",
    "family_for_pipeline",
    "load_pipeline",
    "wrap_pipeline",
]
