"""Stable Diffusion pipelines built from configs (random weights, no downloads), in one place.

- [`build_tiny_pipeline`]: small enough for CPU tests;
- [`build_sd15_pipeline`]: Stable Diffusion 1.5's architecture (or its layout at narrow width), for the cost
  benchmark;
- [`build_toy_components`]: the architecture of the shipped toy-world model, which ``b2trl.toy.pretrain``
  trains from scratch.

Importing this module imports only torch; diffusers and transformers are imported by the builders.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch

# ids of the special tokens of the character tokenizer below (after its 2 x 256 byte tokens)
_CHAR_BOS, _CHAR_EOS = 512, 513


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses as its base alphabet."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_char_tokenizer(folder: str, model_max_length: int = 16) -> None:
    """Write a character-level CLIP tokenizer (byte alphabet, no merges) that `CLIPTokenizer` loads offline."""
    os.makedirs(folder, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}, f)


def char_tokenizer(model_max_length: int = 16):
    """A `CLIPTokenizer` over single characters (see [`write_char_tokenizer`]), loaded from a temporary folder."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_char_tokenizer(folder, model_max_length)
        return CLIPTokenizer.from_pretrained(folder)


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
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_CHAR_EOS + 1,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=model_max_length,
            bos_token_id=_CHAR_BOS,
            eos_token_id=_CHAR_EOS,
            pad_token_id=_CHAR_EOS,
        )
    )
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


def build_tiny_sdxl_vae(output_dir: Optional[str] = None, *, seed: int = 0, sample_size: int = 16,
                        force_upcast: bool = True):
    """
    A randomly initialised tiny `AutoencoderKL` with SDXL's latent scaling (0.13025) and 4 latent channels; with
    ``force_upcast=False`` it stands in for a separate fp16-safe VAE. Saved to `output_dir` when given.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )
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
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(hidden_size, **extra):
        return CLIPTextConfig(
            vocab_size=_CHAR_EOS + 1,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,  # SDXL conditions on the penultimate layer
            num_attention_heads=2,
            max_position_embeddings=model_max_length,
            bos_token_id=_CHAR_BOS,
            eos_token_id=_CHAR_EOS,
            pad_token_id=_CHAR_EOS,
            **extra,
        )

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
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
        return CLIPTextConfig(
            vocab_size=49408,  # CLIP's vocabulary; the character tokenizer uses its first 514 ids
            hidden_size=widths[i],
            intermediate_size=4 * widths[i],
            num_hidden_layers=layers[i],
            num_attention_heads=heads[i],
            max_position_embeddings=max_length,
            hidden_act=("quick_gelu", "gelu")[i],
            bos_token_id=_CHAR_BOS,
            eos_token_id=_CHAR_EOS,
            pad_token_id=_CHAR_EOS,
            **extra,
        )

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

def t5_char_tokenizer(model_max_length: int = 16):
    """
    A T5 tokenizer (Unigram over single printable characters, no sentinel ids) that loads offline: ``<pad>``,
    ``</s>`` and ``<unk>`` are ids 0-2 as in T5, words start with ``▁`` and every sequence ends with ``</s>``.
    """
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


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
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(hidden_size):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=_CHAR_EOS + 1,
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=2,  # SD3 conditions on the penultimate layer
                num_attention_heads=2,
                max_position_embeddings=model_max_length,
                projection_dim=hidden_size,
                bos_token_id=_CHAR_BOS,
                eos_token_id=_CHAR_EOS,
                pad_token_id=_CHAR_EOS,
            )
        )

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=2 * sample_size,
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
