"""SD3-family pipelines built from configs: the tiny test pipeline and the flow toy model."""

from __future__ import annotations

from typing import Optional

import torch

from .common import char_tokenizer, t5_char_tokenizer, tiny_clip_config, tiny_vae


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
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

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
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=joint_attention_dim,
            d_kv=8,
            d_ff=2 * joint_attention_dim,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
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


def build_toy_sd3_components(clip_tokenizer, t5_tokenizer, latent_channels: int = 4):
    """
    The shipped toy flow model's architecture with random weights, for ``b2trl.toy.pretrain_flow``:
    ``(transformer, text_encoder, text_encoder_2, text_encoder_3, scheduler)``. The VAE is not built: the flow
    model reuses the SD toy model's trained one (32x32 images, 8x8 latents of `latent_channels` channels).

    - `SD3Transformer2DModel`: patch 2 over 8x8 latents (16 image tokens), 4 joint blocks of 4 heads x 32 with
      RMS-normed queries and keys, text width 128, pooled width 128;
    - two `CLIPTextModelWithProjection` (width 64, 3 layers, projection 64) for `clip_tokenizer` (both use the
      same tokenizer), whose penultimate states and projections SD3 concatenates;
    - a 2-layer `T5EncoderModel` of width 128 (gated GELU) for `t5_tokenizer`;
    - `FlowMatchEulerDiscreteScheduler` with shift 3.0, as SD3 ships.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=3,  # SD3 reads the penultimate layer
                num_attention_heads=4,
                max_position_embeddings=clip_tokenizer.model_max_length,
                projection_dim=64,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,
        caption_projection_dim=128,  # the transformer's width, 4 x 32
        pooled_projection_dim=2 * 64,  # both CLIP projections side by side
        pos_embed_max_size=4,
        qk_norm="rms_norm",
    )
    text_encoder, text_encoder_2 = clip(), clip()
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    return transformer, text_encoder, text_encoder_2, text_encoder_3, FlowMatchEulerDiscreteScheduler(shift=3.0)
