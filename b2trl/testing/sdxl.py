"""SDXL pipelines built from configs: the tiny test pipeline, its VAE, and the SDXL base shape."""

from __future__ import annotations

from typing import Optional

import torch

from .common import char_tokenizer, clip_shaped_config, ddim_scheduler, tiny_clip_config, tiny_vae


def build_tiny_sdxl_vae(output_dir: Optional[str] = None, *, seed: int = 0, sample_size: int = 16,
                        force_upcast: bool = True):
    """
    A randomly initialised tiny `AutoencoderKL` with SDXL's latent scaling (0.13025) and 4 latent channels; with
    ``force_upcast=False`` it stands in for a separate fp16-safe VAE. Saved to `output_dir` when given.
    """

    torch.manual_seed(seed)
    vae = tiny_vae(sample_size, scaling_factor=0.13025, force_upcast=force_upcast)
    if output_dir is not None:
        vae.save_pretrained(output_dir)
    return vae


def build_tiny_sdxl_pipeline(
    output_dir: Optional[str] = None,
    *,
    seed: int = 0,
    sample_size: int = 8,
    model_max_length: int = 16,
    text_hidden_sizes: tuple[int, int] = (16, 32),
    projection_dim: int = 24,
    time_embed_dim: int = 8,
):
    """
    Build a randomly initialised `StableDiffusionXLPipeline` small enough for CPU tests.

    It has SDXL's structure at tiny width: two CLIP text encoders of different widths (the second with a
    projection, whose output is the pooled embedding), a UNet whose cross-attention takes both encoders'
    hidden states side by side and whose ``text_time`` embedding takes the pooled embedding and six size
    ids, a VAE that asks for fp32 decoding (``force_upcast``), and an Euler scheduler as SDXL ships. Images are
    ``2 * sample_size`` pixels square. When `output_dir` is given the pipeline is also saved there, and that
    folder loads with `StableDiffusionXLPipeline.from_pretrained` and [`~b2trl.load_pipeline`].

    Returns:
        The `diffusers.StableDiffusionXLPipeline`.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def text_config(hidden_size, **extra):
        # two layers: SDXL conditions on the penultimate one
        return tiny_clip_config(hidden_size, model_max_length, num_hidden_layers=2, **extra)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(text_hidden_sizes),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six size ids, each embedded to time_embed_dim, next to the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        norm_num_groups=8,
    )
    vae = build_tiny_sdxl_vae(seed=seed + 1, sample_size=2 * sample_size)
    text_encoder = CLIPTextModel(text_config(text_hidden_sizes[0]))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(text_hidden_sizes[1], projection_dim=projection_dim))
    scheduler = EulerDiscreteScheduler.from_config(ddim_scheduler().config, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=char_tokenizer(model_max_length),
        tokenizer_2=char_tokenizer(model_max_length),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def build_sdxl_pipeline(resolution: int = 1024, tiny_width: bool = False, seed: int = 0):
    """
    A `StableDiffusionXLPipeline` with SDXL base 1.0's architecture and random weights (no download): a UNet of
    2.57 B parameters (three levels, 1/2/10 transformer layers, cross-attention over 2048 channels), CLIP ViT-L
    and OpenCLIP ViT-bigG-shaped text encoders over 77 positions, the 4-level VAE with ``force_upcast``, and an
    Euler scheduler, for the cost benchmark and memory measurements.

    Build it under ``torch.device("cuda")`` to initialise the weights on the GPU, or under
    ``torch.device("meta")`` for the architecture alone.

    Args:
        resolution (`int`, *optional*, defaults to `1024`): image side in pixels (latents are 8 times smaller).
        tiny_width (`bool`, *optional*, defaults to `False`):
            Keep the layout (three UNet levels with 1/2/10 transformer layers scaled down to 1/1/2, two text
            encoders, 4 VAE levels) at narrow channels, so that the same code path runs in seconds on a CPU.
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if tiny_width:
        widths, layers, heads, max_length = (32, 64), (2, 2), (2, 4), 16
        unet_shape = dict(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                          attention_head_dim=(2, 4, 8), addition_time_embed_dim=16, layers_per_block=1)
        vae_shape = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    else:
        widths, layers, heads, max_length = (768, 1280), (12, 32), (12, 20), 77
        unet_shape = dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                          attention_head_dim=(5, 10, 20), addition_time_embed_dim=256, layers_per_block=2)
        vae_shape = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)

    def text_config(i, **extra):
        return clip_shaped_config(widths[i], layers[i], heads[i], max_length, ("quick_gelu", "gelu")[i], **extra)

    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(widths),
        use_linear_projection=True,
        addition_embed_type="text_time",
        projection_class_embeddings_input_dim=6 * unet_shape["addition_time_embed_dim"] + widths[1],
        **unet_shape,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=resolution,
        scaling_factor=0.13025,
        force_upcast=True,
        **vae_shape,
    )
    text_encoder = CLIPTextModel(text_config(0))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(1, projection_dim=widths[1]))
    with torch.device("cpu"):  # Euler keeps its sigmas on the CPU, which a meta-device build cannot copy to
        scheduler = EulerDiscreteScheduler.from_config(ddim_scheduler().config, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=char_tokenizer(max_length),
        tokenizer_2=char_tokenizer(max_length),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
