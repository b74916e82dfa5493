"""Stable Diffusion 1.x pipelines built from configs: the tiny test pipeline and the SD1.5 shape."""

from __future__ import annotations

from typing import Optional

import torch

from .common import _CHAR_BOS, _CHAR_EOS, assemble_pipeline, char_tokenizer, ddim_scheduler, tiny_clip_config, tiny_vae


def build_tiny_pipeline(
    output_dir: Optional[str] = None,
    *,
    seed: int = 0,
    sample_size: int = 8,
    model_max_length: int = 16,
):
    """
    Build a randomly initialised `StableDiffusionPipeline` small enough for CPU tests.

    The UNet has cross-attention blocks, so TRL's LoRA targets (to_q/to_k/to_v/to_out.0) exist. Images are
    ``2 * sample_size`` pixels square. When `output_dir` is given the pipeline is also saved there, and that
    folder loads with `StableDiffusionPipeline.from_pretrained` and `DefaultDDPOStableDiffusionPipeline`.

    Returns:
        The `diffusers.StableDiffusionPipeline`.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    # the modules are created in this order after the seed, so a seed always gives the same weights
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = tiny_vae(2 * sample_size)
    text_encoder = CLIPTextModel(tiny_clip_config(16, model_max_length, num_hidden_layers=1))
    tokenizer = char_tokenizer(model_max_length)
    pipe = assemble_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddim_scheduler()
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def build_sd15_pipeline(resolution: int = 512, tiny_width: bool = False, seed: int = 0):
    """
    A `StableDiffusionPipeline` with Stable Diffusion 1.5's architecture and random weights (no download): its
    UNet has SD1.5's 859.5 M parameters, the text encoder is a 12-layer CLIP of width 768 over 77 positions.

    Build it under ``torch.device("cuda")`` to initialise the weights on the GPU (seconds faster), or under
    ``torch.device("meta")`` for the architecture alone.

    Args:
        resolution (`int`, *optional*, defaults to `512`): image side in pixels (latents are 8 times smaller).
        tiny_width (`bool`, *optional*, defaults to `False`):
            Keep the layout (4 UNet levels, 4 VAE levels, CLIP text encoder) at narrow channels and a 2-layer text
            encoder, so that the same code path runs in seconds on a CPU.
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_dim, max_length = (64, 16) if tiny_width else (768, 77)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        **(dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1) if tiny_width else {}),
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64) if tiny_width else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1 if tiny_width else 2,
        latent_channels=4,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,  # SD1.5's vocabulary; the character tokenizer uses its first 514 ids
            hidden_size=text_dim,
            intermediate_size=4 * text_dim,
            num_hidden_layers=2 if tiny_width else 12,
            num_attention_heads=4 if tiny_width else 12,
            max_position_embeddings=max_length,
            hidden_act="quick_gelu",
            bos_token_id=_CHAR_BOS,
            eos_token_id=_CHAR_EOS,
            pad_token_id=_CHAR_EOS,
        )
    )
    return assemble_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(max_length), unet=unet, scheduler=ddim_scheduler()
    )
