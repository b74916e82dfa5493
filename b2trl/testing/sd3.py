"""SD3-family pipelines built from configs: the tiny test pipeline and the SD3.5 Medium shape."""

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


def build_tiny_sd3_pipeline(
    output_dir: Optional[str] = None,
    *,
    seed: int = 0,
    sample_size: int = 8,
    model_max_length: int = 16,
    t5_max_length: int = 16,
    clip_hidden_sizes: tuple[int, int] = (8, 16),
    joint_attention_dim: int = 32,
    shift: float = 3.0,
):
    """
    Build a randomly initialised `StableDiffusion3Pipeline` small enough for CPU tests.

    It has SD3.5's structure at tiny width: two `CLIPTextModelWithProjection` encoders of different widths (their
    projections side by side are the pooled embedding), a T5 encoder whose tokenizer's ``model_max_length`` is the
    length the model is meant to be used with (`t5_max_length`), an MMDiT transformer with a dual-attention
    first block and RMS-normed queries and keys, a VAE with 16 latent channels, no quantisation convolutions and a
    ``shift_factor``, and a `FlowMatchEulerDiscreteScheduler` with `shift`. Images are ``2 * sample_size`` pixels
    square. When `output_dir` is given the pipeline is also saved there, and that folder loads with
    `StableDiffusion3Pipeline.from_pretrained` and [`~b2trl.load_pipeline`].

    Returns:
        The `diffusers.StableDiffusion3Pipeline`.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    def clip(hidden_size):
        # two layers: SD3 conditions on the penultimate one
        config = tiny_clip_config(hidden_size, model_max_length, num_hidden_layers=2, projection_dim=hidden_size)
        return CLIPTextModelWithProjection(config)

    t5_tokenizer = t5_char_tokenizer(t5_max_length)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=16,
        pooled_projection_dim=sum(clip_hidden_sizes),
        pos_embed_max_size=sample_size,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = tiny_vae(
        2 * sample_size,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,  # SD3's values
        shift_factor=0.0609,
    )
    text_encoder, text_encoder_2 = clip(clip_hidden_sizes[0]), clip(clip_hidden_sizes[1])
    text_encoder_3 = tiny_t5_encoder(t5_tokenizer, joint_attention_dim)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(model_max_length),
        text_encoder_2=text_encoder_2,
        tokenizer_2=char_tokenizer(model_max_length),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def build_sd35_medium_pipeline(resolution: int = 1024, tiny_width: bool = False, seed: int = 0, with_t5: bool = True,
                               t5_max_length: int = 256):
    """
    A `StableDiffusion3Pipeline` with Stable Diffusion 3.5 Medium's architecture and random weights (no download),
    for the cost benchmark and memory measurements.

    The shape follows the published configs of ``stabilityai/stable-diffusion-3.5-medium`` (its ``transformer``,
    ``vae``, ``text_encoder*`` configs) and diffusers' `SD3Transformer2DModel` arguments; parameter counts are
    those of this builder on ``torch.device("meta")`` with diffusers 0.42.1 and transformers 5.24.0:

    - `SD3Transformer2DModel` (MMDiT-X), **2,243,171,520** parameters (2.24 B): patch 2 over 16 latent channels,
      24 joint blocks of 24 heads x 64 (width 1536), RMS-normed queries and keys, a second image-only attention in
      blocks 0-12 (``dual_attention_layers``), context projected from T5's width 4096, pooled projection 2048;
      its fixed sine-cosine position embeddings for up to 384 x 384 patches are a buffer of 226,492,416 more
      values (2.47 B together, the "2.5 B" Stability AI quotes for the model);
    - `AutoencoderKL` with 16 latent channels, 4 levels of 128/256/512/512 channels, no quantisation
      convolutions, ``scaling_factor`` 1.5305 and ``shift_factor`` 0.0609: 83,819,683 parameters;
    - CLIP ViT-L (`CLIPTextModelWithProjection`, width 768, 12 layers, projection 768): 123,650,304 parameters,
      and OpenCLIP ViT-bigG-shaped (width 1280, 32 layers, projection 1280): 694,659,840 parameters, over 77
      positions, whose penultimate states and projections SD3 concatenates;
    - T5 v1.1 XXL's encoder (`T5EncoderModel`, d_model 4096, 24 layers, 64 heads x 64, d_ff 10240, gated GELU,
      vocabulary 32128): **4,762,310,656** parameters, or no T5 at all with ``with_t5=False``
      (``text_encoder_3=None, tokenizer_3=None``: the pipeline then conditions on zeros in T5's place, SD3's
      documented memory saving);
    - `FlowMatchEulerDiscreteScheduler` with shift 3.0.

    The tokenizers are the character-level stand-ins of ``b2trl.testing`` (CLIP ids below 514, T5 ids below 98,
    inside both vocabularies); the T5 tokenizer's ``model_max_length`` is `t5_max_length`, the length b2trl's SD3
    family pads T5 to (256 by default: diffusers' default ``max_sequence_length``, beyond which the model card warns
    of artefacts).

    Build it under ``torch.device("cuda")`` to initialise the weights on the GPU, or under
    ``torch.device("meta")`` for the architecture alone.

    Args:
        resolution (`int`, *optional*, defaults to `1024`):
            image side in pixels (latents are 8 times smaller); the pipeline needs a multiple of 16.
        tiny_width (`bool`, *optional*, defaults to `False`):
            Keep the layout (joint blocks with a dual-attention first block and RMS-normed queries and keys, two
            CLIP encoders with projections, a gated-GELU T5, a 4-level 16-channel VAE) at narrow widths and few
            layers, so that the same code path runs in seconds on a CPU.
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.
        with_t5 (`bool`, *optional*, defaults to `True`): build the T5 encoder and its tokenizer.
        t5_max_length (`int`, *optional*, defaults to `256`):
            the T5 tokenizer's ``model_max_length`` (16 with `tiny_width`, whatever is passed).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if tiny_width:
        clip_widths, clip_layers, clip_heads, clip_length = (16, 32), (2, 2), (2, 4), 16
        t5_shape = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)
        t5_max_length = 16
        transformer_shape = dict(num_layers=3, attention_head_dim=8, num_attention_heads=4, dual_attention_layers=(0,),
                                 pos_embed_max_size=max(1, resolution // 16))
        vae_shape = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    else:
        clip_widths, clip_layers, clip_heads, clip_length = (768, 1280), (12, 32), (12, 20), 77
        t5_shape = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24)
        transformer_shape = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                 dual_attention_layers=tuple(range(13)), pos_embed_max_size=384)
        vae_shape = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)

    def clip(i):
        config = clip_shaped_config(clip_widths[i], clip_layers[i], clip_heads[i], clip_length,
                                    ("quick_gelu", "gelu")[i], projection_dim=clip_widths[i])
        return CLIPTextModelWithProjection(config)

    width = transformer_shape["num_attention_heads"] * transformer_shape["attention_head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        joint_attention_dim=t5_shape["d_model"],  # T5's width; the CLIP states are zero-padded to it
        caption_projection_dim=width,
        pooled_projection_dim=sum(clip_widths),  # both CLIP projections side by side
        qk_norm="rms_norm",
        **transformer_shape,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        sample_size=resolution,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        **vae_shape,
    )
    text_encoder, text_encoder_2 = clip(0), clip(1)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = t5_char_tokenizer(t5_max_length)
        text_encoder_3 = t5_encoder(tokenizer_3, tiny_width, **t5_shape)
    with torch.device("cpu"):  # the scheduler keeps its sigmas on the CPU, which a meta-device build cannot copy to
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(clip_length),
        text_encoder_2=text_encoder_2,
        tokenizer_2=char_tokenizer(clip_length),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
