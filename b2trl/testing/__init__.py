"""Diffusion pipelines built from configs (random weights, no downloads), in one place: one module per family.

- [`build_tiny_pipeline`]: small enough for CPU tests;
- [`build_sd15_pipeline`]: Stable Diffusion 1.5's architecture (or its layout at narrow width), for the cost
  benchmark;
- [`build_tiny_sdxl_pipeline`], [`build_sdxl_pipeline`]: a tiny SDXL pipeline for tests, and SDXL base's shape;
- [`build_tiny_sd3_pipeline`]: a tiny SD3 pipeline for tests;
- [`build_sd35_medium_pipeline`]: Stable Diffusion 3.5 Medium's shape (or its layout at narrow width), for the cost
  benchmark;
- [`build_tiny_flux_pipeline`], [`build_flux_pipeline`]: a tiny FLUX.1 pipeline for tests, and FLUX.1-dev's (or
  schnell's) shape for the cost benchmark.
- [`build_tiny_qwenimage_pipeline`], [`build_qwenimage_pipeline`]: a tiny Qwen-Image pipeline for tests, and
  Qwen-Image's shape (or its layout at narrow width), for the cost benchmark.
- [`build_tiny_zimage_pipeline`], [`build_zimage_pipeline`]: a tiny Z-Image pipeline for tests (with a local
  Qwen-style tokenizer, [`qwen_char_tokenizer`]), and Z-Image's shape (or its layout at narrow width).

The shipped toy models' architectures are not test builders: they are in ``b2trl.toy.architecture``.

Importing this module imports only torch; diffusers and transformers are imported by the builders.
"""

from .common import assemble_pipeline, char_tokenizer, ddim_scheduler, t5_char_tokenizer, write_char_tokenizer
from .flux import build_flux_pipeline, build_tiny_flux_pipeline
from .qwenimage import build_qwenimage_pipeline, build_tiny_qwenimage_pipeline, qwen_tokenizer
from .sd import build_sd15_pipeline, build_tiny_pipeline
from .sd3 import build_sd35_medium_pipeline, build_tiny_sd3_pipeline
from .sdxl import build_sdxl_pipeline, build_tiny_sdxl_pipeline, build_tiny_sdxl_vae
from .zimage import build_tiny_zimage_pipeline, build_zimage_pipeline, qwen_char_tokenizer

__all__ = [
    "assemble_pipeline",
    "build_flux_pipeline",
    "build_qwenimage_pipeline",
    "build_sd15_pipeline",
    "build_sd35_medium_pipeline",
    "build_sdxl_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_pipeline",
    "build_tiny_qwenimage_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_sdxl_vae",
    "build_tiny_zimage_pipeline",
    "build_zimage_pipeline",
    "char_tokenizer",
    "ddim_scheduler",
    "qwen_tokenizer",
    "qwen_char_tokenizer",
    "t5_char_tokenizer",
    "write_char_tokenizer",
]
