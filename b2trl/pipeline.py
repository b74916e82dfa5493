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
