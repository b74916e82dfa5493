"""Loading a diffusers pipeline for training, with its family picked from ``model_index.json``."""

from __future__ import annotations

import json
import os
from typing import Optional

from ..accelerator import ensure_accelerate_state
from ..quiet import hide_known_warnings
from .base import LORA_FILE
from .pipeline import TrainingPipeline
from .registry import family_for_class, family_for_pipeline


def _model_index(model: str, path: str, revision: str) -> dict:
    """``model_index.json`` of a local folder or a Hub repository (from the cache when offline)."""
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(
                f"pretrained_model: {model!r} has no model_index.json; pass a diffusers pipeline folder "
                "(written by save_pretrained) or a Hub id."
            )
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = hf_hub_download(path, "model_index.json", revision=revision)
        except Exception as err:  # not found, gated, offline without a cached copy: all mean the same to the user
            raise OSError(
                f"pretrained_model: could not find the model {model!r} (revision {revision!r}): {err}. Check the "
                "id (SD1.5 now lives at 'stable-diffusion-v1-5/stable-diffusion-v1-5'; 'runwayml/...' was deleted), "
                "log in for gated models, or download it first when offline."
            ) from err
    with open(index) as f:
        return json.load(f)


def _load_vae(pretrained_vae: str):
    """An `AutoencoderKL` from a Hub id or folder holding the VAE's own ``config.json`` (e.g. the fp16-fix VAE), or
    from the ``vae`` subfolder of a diffusers pipeline folder."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(pretrained_vae)
    is_pipeline = os.path.isfile(os.path.join(path, "model_index.json"))
    try:
        return AutoencoderKL.from_pretrained(path, subfolder="vae" if is_pipeline else None)
    except (OSError, ValueError) as err:
        raise OSError(
            f"pretrained_vae: could not load a VAE from {pretrained_vae!r}: {err}. Pass an AutoencoderKL folder or "
            "Hub id (e.g. 'madebyollin/sdxl-vae-fp16-fix'), or a diffusers pipeline folder with a vae/ subfolder."
        ) from err


def load_pipeline(
    pretrained_model_name_or_path: str,
    *,
    revision: str = "main",
    use_lora: bool = True,
    pretrained_vae: Optional[str] = None,
    torch_dtype=None,
):
    """
    Load a diffusers pipeline from a Hub id or a local folder and set it up for training.

    The model family (SD1.x, SDXL, SD3/3.5, FLUX.1, Qwen-Image, Z-Image) is read from the folder's
    ``model_index.json``; the result is a
    [`~b2trl.models.TrainingPipeline`] (a TRL `DefaultDDPOStableDiffusionPipeline`) that
    [`B2DiffuRLTrainer`] takes as `sd_pipeline`.

    Args:
        pretrained_model_name_or_path (`str`):
            A diffusers pipeline folder or Hub id (e.g. ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``).
        revision (`str`, *optional*, defaults to `"main"`): Hub revision.
        use_lora (`bool`, *optional*, defaults to `True`):
            Train a LoRA adapter (rank 4 on the family's usual target modules) instead of the whole denoiser.
        pretrained_vae (`str`, *optional*):
            A VAE to use instead of the model's own: a Hub id or folder of an `AutoencoderKL` (for SDXL in fp16,
            ``"madebyollin/sdxl-vae-fp16-fix"``, which decodes in fp16 where the released VAE must run in fp32).
        torch_dtype (`torch.dtype`, *optional*): load the weights in this dtype (e.g. `torch.bfloat16` for
            Qwen-Image or FLUX.1, whose float32 weights alone take 115 GB and 68 GB); the trainer places them in the
            run's precision afterwards either way.
    """
    ensure_accelerate_state()
    model = pretrained_model_name_or_path
    path = os.path.expanduser(model)
    looks_local = path.startswith((os.path.sep, ".")) or path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(
            f"pretrained_model: no folder at {model!r}. Pass a diffusers pipeline folder (with model_index.json) "
            "or a Hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    family = family_for_class(_model_index(model, path, revision).get("_class_name", ""), model)
    components = {} if pretrained_vae is None else {"vae": _load_vae(pretrained_vae)}
    try:
        if torch_dtype is not None:
            components["torch_dtype"] = torch_dtype
        pipe = family.pipeline_class.from_pretrained(path, revision=revision, **components)
    except OSError as err:
        raise OSError(f"pretrained_model: could not load {model!r}: {err}") from err
    if pretrained_vae is not None:
        channels = getattr(pipe, family.denoiser_name).config.in_channels
        if pipe.vae.config.latent_channels != channels:
            raise ValueError(
                f"pretrained_vae: {pretrained_vae!r} has {pipe.vae.config.latent_channels} latent channels, but "
                f"{model!r}'s {family.denoiser_name} takes {channels}; pass a VAE made for this model."
            )
    if os.path.isfile(os.path.join(path, LORA_FILE)):
        # a folder that already holds LoRA weights (e.g. a previous run's output on top of a full pipeline)
        with hide_known_warnings(pipe):
            pipe.load_lora_weights(path, weight_name=LORA_FILE)
        use_lora = True
    family.prepare(pipe, use_lora=use_lora)
    pipeline = TrainingPipeline(pipe, family, use_lora=use_lora, pretrained_model=path, revision=revision)
    pipeline.pretrained_vae = pretrained_vae  # for the model card: the LoRA was trained against this VAE's images
    return pipeline


def wrap_pipeline(pipe, *, use_lora: bool = True):
    """
    Wrap a diffusers pipeline that is already in memory as a [`~b2trl.models.TrainingPipeline`], set up as
    [`load_pipeline`] sets up one loaded from disk (the family's sampler scheduler, no safety checker, frozen
    VAE and text encoders, a frozen denoiser when training LoRA).

    Useful for pipelines built from configs (random weights, benchmarks) or modified before training, without
    a round trip through `save_pretrained`.
    """
    ensure_accelerate_state()
    family = family_for_pipeline(pipe)
    family.prepare(pipe, use_lora=use_lora)
    return TrainingPipeline(pipe, family, use_lora=use_lora, pretrained_model=getattr(pipe, "name_or_path", None))
