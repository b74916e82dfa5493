"""The shipped toy models' architectures, with random weights: what ``b2trl.toy.pretrain`` and
``b2trl.toy.pretrain_flow`` train from scratch (``b2trl/toy/model/README.md`` and ``model_sd3/README.md``
describe the trained models).

Importing this module imports nothing heavy; diffusers and transformers are imported by the builders.
"""

from __future__ import annotations


def ddim_scheduler():
    """Stable Diffusion 1.x's noise schedule (scaled-linear betas 0.00085-0.012, 1000 steps) with DDIM sampling."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler):
    """A `StableDiffusionPipeline` of the given parts, without safety checker or feature extractor."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_toy_components(tokenizer):
    """
    The shipped toy-world model's architecture with random weights: ``(vae, unet, text_encoder, scheduler)`` for
    `tokenizer` (its vocabulary size, special tokens and ``model_max_length``). 32x32 images, 8x8x4 latents;
    ``b2trl.toy.pretrain`` trains these from scratch and ``b2trl/toy/model/README.md`` describes them.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return vae, unet, text_encoder, ddim_scheduler()


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
