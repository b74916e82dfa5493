"""Loading a Stable Diffusion pipeline for training, without TRL's start-up pitfalls."""

from __future__ import annotations

import logging as stdlib_logging
import os

from accelerate import PartialState


def ensure_accelerate_state(**kwargs) -> PartialState:
    """
    Create accelerate's process state if nothing has yet.

    TRL's pipeline and trainer log through accelerate's logger, which raises "You must initialize the accelerate
    state" when no state exists. `kwargs` go to `PartialState` (e.g. ``cpu=True`` for gloo on CPU under torchrun).
    """
    return PartialState(**kwargs)


def load_pipeline(pretrained_model_name_or_path: str, *, revision: str = "main", use_lora: bool = True):
    """
    Load a [`~trl.DefaultDDPOStableDiffusionPipeline`] from a Hub id or a local folder.

    Args:
        pretrained_model_name_or_path (`str`):
            A diffusers Stable Diffusion folder or Hub id (e.g. ``"runwayml/stable-diffusion-v1-5"``).
        revision (`str`, *optional*, defaults to `"main"`): Hub revision.
        use_lora (`bool`, *optional*, defaults to `True`):
            Train a LoRA adapter (rank 4 on the UNet's attention projections) instead of the whole UNet.
    """
    from trl import DefaultDDPOStableDiffusionPipeline

    ensure_accelerate_state()
    path = os.path.expanduser(pretrained_model_name_or_path)
    looks_local = path.startswith((os.path.sep, ".")) or path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(
            f"pretrained_model: no folder at {pretrained_model_name_or_path!r}. Pass a diffusers pipeline "
            "folder (with model_index.json) or a Hub id such as 'runwayml/stable-diffusion-v1-5'."
        )
    # Starting a LoRA run from a plain base model is the normal case, yet TRL warns that no LoRA weights were
    # found in the folder; keep its logger quiet for this call only.
    trl_logger = stdlib_logging.getLogger("trl.models.modeling_sd_base")
    level = trl_logger.level
    trl_logger.setLevel(stdlib_logging.ERROR)
    try:
        return DefaultDDPOStableDiffusionPipeline(path, pretrained_model_revision=revision, use_lora=use_lora)
    finally:
        trl_logger.setLevel(level)


def wrap_pipeline(sd_pipeline, *, use_lora: bool = True):
    """
    Wrap a `StableDiffusionPipeline` that is already in memory as a [`~trl.DefaultDDPOStableDiffusionPipeline`],
    set up as [`load_pipeline`] sets up one loaded from disk (DDIM scheduler, no safety checker, frozen VAE and
    text encoder, a frozen UNet when training LoRA).

    Useful for pipelines built from configs (random weights, benchmarks) or modified before training, without
    a round trip through `save_pretrained`.
    """
    from diffusers import DDIMScheduler
    from trl import DefaultDDPOStableDiffusionPipeline

    ensure_accelerate_state()
    # TRL's constructor only takes a path; build its object around this pipeline instead
    wrapped = DefaultDDPOStableDiffusionPipeline.__new__(DefaultDDPOStableDiffusionPipeline)
    wrapped.sd_pipeline = sd_pipeline
    wrapped.use_lora = use_lora
    wrapped.pretrained_model = getattr(sd_pipeline, "name_or_path", None)
    wrapped.pretrained_revision = "main"
    sd_pipeline.scheduler = DDIMScheduler.from_config(sd_pipeline.scheduler.config)
    sd_pipeline.safety_checker = None
    sd_pipeline.vae.requires_grad_(False)
    sd_pipeline.text_encoder.requires_grad_(False)
    sd_pipeline.unet.requires_grad_(not use_lora)
    return wrapped


def compile_unet(unet, **compile_kwargs):
    """
    Compile `unet` with `torch.compile`, in place (`nn.Module.compile`), and return it.

    In place matters: the module object, its parameter names and its PEFT adapters stay as they were, so LoRA
    saving and loading, `accelerator.unwrap_model` and DDP wrapping see the same UNet as without compilation.
    Compilation happens at the first call of each new input shape and mode (no-grad sampling, training), which
    takes minutes for a Stable Diffusion UNet; it pays off over a long run on a GPU, rarely on a CPU.

    Args:
        unet (`torch.nn.Module`): The UNet (call after its LoRA adapter has been added).
        compile_kwargs: Passed to `torch.compile` (e.g. ``mode="max-autotune-no-cudagraphs"``, ``backend=...``).
    """
    unet.compile(**compile_kwargs)
    return unet
