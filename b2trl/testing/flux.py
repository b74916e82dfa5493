"""FLUX.1 pipelines built from configs: the tiny test pipeline and FLUX.1-dev's (or schnell's) real shape."""

from __future__ import annotations

from typing import Optional

import torch

from .common import (
    char_tokenizer,
    clip_shaped_config,
    t5_char_tokenizer,
    t5_encoder,
    tiny_clip_config,
    tiny_t5_encoder,
    tiny_vae,
)

# FLUX.1's VAE: 16 latent channels, no quantisation convolutions, these scale and shift factors
FLUX_VAE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                shift_factor=0.1159)


def _scheduler(guidance_embeds: bool, **shift):
    """FLUX.1-dev's scheduler (a resolution-dependent shift) or schnell's (a fixed shift of 1, i.e. none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not guidance_embeds:
        return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    values = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    values.update(shift)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **values)


def build_tiny_flux_pipeline(
    output_dir: Optional[str] = None,
    *,
    seed: int = 0,
    guidance_embeds: bool = True,
    model_max_length: int = 16,
    t5_max_length: int = 16,
    clip_hidden_size: int = 16,
    joint_attention_dim: int = 32,
    base_image_seq_len: int = 4,
    max_image_seq_len: int = 64,
):
    """
    Build a randomly initialised `FluxPipeline` small enough for CPU tests.

    It has FLUX.1's structure at tiny width: a `CLIPTextModel` whose pooled output conditions the transformer, a T5
    encoder whose tokenizer's ``model_max_length`` is `t5_max_length`, a `FluxTransformer2DModel` with one
    double-stream and one single-stream block over packed 2x2 latent patches (in_channels 64 = 4 x 16 latent
    channels), a VAE with 16 latent channels, no quantisation convolutions, FLUX's ``scaling_factor`` and
    ``shift_factor`` and a 2x downsampling (so images are 4 times the packed grid), and a
    `FlowMatchEulerDiscreteScheduler`.

    With `guidance_embeds` (the default) it is shaped like FLUX.1-dev: a guidance embedding, and a
    resolution-dependent shift (``use_dynamic_shifting``) whose ``mu`` runs from 0.5 at `base_image_seq_len` image
    tokens to 1.15 at `max_image_seq_len` (FLUX ships 256 and 4096; the tiny defaults put 16 and 32 pixel images
    on different shifts). Without it, it is shaped like FLUX.1-schnell: no guidance embedding, a fixed shift of 1.

    ``FluxPipeline`` samples ``default_sample_size * vae_scale_factor`` = 256 pixels when not told the size; tests
    pass a small `resolution` instead. When `output_dir` is given the pipeline is also saved there, and that folder
    loads with `FluxPipeline.from_pretrained` and [`~b2trl.load_pipeline`].

    Returns:
        The `diffusers.FluxPipeline`.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    t5_tokenizer = t5_char_tokenizer(t5_max_length)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=clip_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),  # sums to the head width
    )
    text_encoder = CLIPTextModel(tiny_clip_config(clip_hidden_size, model_max_length, num_hidden_layers=2))
    text_encoder_2 = tiny_t5_encoder(t5_tokenizer, joint_attention_dim)
    pipe = FluxPipeline(
        scheduler=_scheduler(guidance_embeds, base_image_seq_len=base_image_seq_len,
                             max_image_seq_len=max_image_seq_len),
        vae=tiny_vae(32, **FLUX_VAE),
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(model_max_length),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def build_flux_pipeline(resolution: int = 1024, tiny_width: bool = False, seed: int = 0, schnell: bool = False,
                        t5_max_length: int = 512):
    """
    A `FluxPipeline` with FLUX.1-dev's architecture (or FLUX.1-schnell's) and random weights (no download), for
    the cost benchmark and memory measurements.

    The shape follows the published configs of ``black-forest-labs/FLUX.1-dev`` (its ``transformer``, ``vae``,
    ``text_encoder*`` and ``scheduler`` configs) and diffusers' `FluxTransformer2DModel` arguments; parameter counts
    are those of this builder on ``torch.device("meta")`` with diffusers 0.42.1 and transformers 5.24.0:

    - `FluxTransformer2DModel`, **11,901,408,320** parameters (11.9 B, the "12 B" Black Forest Labs quotes): 19
      double-stream and 38 single-stream blocks of 24 heads x 128 (width 3072), rotary axes (16, 56, 56), packed
      2x2 patches of 16 latent channels (in_channels 64), context projected from T5's width 4096, pooled CLIP
      embedding of 768, and a guidance embedding; FLUX.1-schnell's has no guidance embedding
      (**11,891,178,560**, 10,229,760 fewer);
    - `AutoencoderKL` with 16 latent channels, 4 levels of 128/256/512/512 channels, no quantisation
      convolutions, ``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159: 83,819,683 parameters;
    - CLIP ViT-L's text model (`CLIPTextModel`, width 768, 12 layers, 77 positions), whose pooled output is the
      pooled embedding: 123,060,480 parameters;
    - T5 v1.1 XXL's encoder (`T5EncoderModel`, d_model 4096, 24 layers, 64 heads x 64, d_ff 10240, gated GELU,
      vocabulary 32128): **4,762,310,656** parameters;
    - `FlowMatchEulerDiscreteScheduler`: dev's resolution-dependent shift (``mu`` from 0.5 at 256 image tokens to
      1.15 at 4096, base shift 3.0), schnell's fixed shift of 1.

    The tokenizers are the character-level stand-ins of ``b2trl.testing`` (CLIP ids below 514, T5 ids below 98,
    inside both vocabularies); the T5 tokenizer's ``model_max_length`` is `t5_max_length` (FLUX.1-dev's 512 by
    default; the FLUX family pads to at most 256 for schnell).

    Build it under ``torch.device("cuda")`` to initialise the weights on the GPU, or under
    ``torch.device("meta")`` for the architecture alone.

    Args:
        resolution (`int`, *optional*, defaults to `1024`):
            image side in pixels, a multiple of 16 (8x VAE, then 2x2 packing): the pipeline's
            ``default_sample_size`` is set to it (an attribute, not saved by ``save_pretrained``; a loaded
            ``FluxPipeline`` samples 1024 unless told otherwise, so pass it as the trainer's ``resolution``).
        tiny_width (`bool`, *optional*, defaults to `False`):
            Keep the layout (double- and single-stream blocks with rotary axes, a guidance embedding, a CLIP text
            model, a gated-GELU T5, a 4-level 16-channel VAE) at narrow widths and few layers, so that the same
            code path runs in seconds on a CPU.
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.
        schnell (`bool`, *optional*, defaults to `False`): FLUX.1-schnell's shape (no guidance embedding, no shift).
        t5_max_length (`int`, *optional*, defaults to `512`):
            the T5 tokenizer's ``model_max_length`` (16 with `tiny_width`, whatever is passed).
    """
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 (8x VAE, then 2x2 packing), got {resolution}.")
    torch.manual_seed(seed)
    if tiny_width:
        clip_width, clip_layers, clip_heads, clip_length = 16, 2, 2, 16
        t5_shape = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
        t5_max_length = 16
        transformer_shape = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                 axes_dims_rope=(4, 6, 6))
        vae_shape = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    else:
        clip_width, clip_layers, clip_heads, clip_length = 768, 12, 12, 77
        t5_shape = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
        transformer_shape = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                 axes_dims_rope=(16, 56, 56))
        vae_shape = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        joint_attention_dim=t5_shape["d_model"],
        pooled_projection_dim=clip_width,
        guidance_embeds=not schnell,
        **transformer_shape,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=resolution,
        **FLUX_VAE,
        **vae_shape,
    )
    text_encoder = CLIPTextModel(clip_shaped_config(clip_width, clip_layers, clip_heads, clip_length, "quick_gelu"))
    tokenizer_2 = t5_char_tokenizer(t5_max_length)
    text_encoder_2 = t5_encoder(tokenizer_2, tiny_width, **t5_shape)
    with torch.device("cpu"):  # the scheduler keeps its sigmas on the CPU, which a meta-device build cannot copy to
        scheduler = _scheduler(not schnell)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(clip_length),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    # the pipeline's (and the FLUX family's) default size: the built resolution, as the SD builders' sample_size
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return pipe
