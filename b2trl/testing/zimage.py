"""Z-Image pipelines built from configs: the tiny test pipeline and Z-Image's real shape (random weights)."""

from __future__ import annotations

import tempfile
from typing import Optional

import torch

from .common import _byte_alphabet, tiny_vae

# Qwen3's chat markup as the pipeline uses it: a user turn, then the assistant's opening; with
# enable_thinking=False Qwen3 adds an empty thinking block, with True (ZImagePipeline's) nothing
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Z-Image's VAE (FLUX.1's autoencoder): its latent normalisation
VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR = 0.3611, 0.1159


def qwen_char_tokenizer(model_max_length: int = 512):
    """
    A `Qwen2Tokenizer` (byte-level BPE without merges, so one token per byte) with Qwen3's special tokens and a
    chat template that accepts ``enable_thinking``, as `ZImagePipeline` calls it; it loads offline. Ids are the 256
    byte tokens, then ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of sequence),
    ``<think>`` and ``</think>``: 261 in all.
    """
    from transformers import AutoTokenizer, Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(_SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # through disk once, so that the object is what from_pretrained gives back (chat template included)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _qwen3(tokenizer, **shape):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **shape,
    )
    return Qwen3Model(config)


def build_tiny_zimage_pipeline(
    output_dir: Optional[str] = None,
    *,
    seed: int = 0,
    sample_size: int = 16,
    text_width: int = 32,
    shift: float = 3.0,
):
    """
    Build a randomly initialised `ZImagePipeline` small enough for CPU tests.

    It has Z-Image's structure at tiny width: a two-layer `Qwen3Model` (the pipeline reads its penultimate hidden
    states) over [`qwen_char_tokenizer`] padded to 512 tokens as the pipeline pads; a `ZImageTransformer2DModel`
    of width 32 (2 heads of 16, RoPE axes 4/6/6) with one noise refiner, one context refiner and two main blocks;
    a VAE with 16 latent channels, no quantisation convolutions and Z-Image's scaling and shift factors; a
    `FlowMatchEulerDiscreteScheduler` with `shift` and no resolution-dependent shift (as Z-Image-Turbo ships).
    Images are `sample_size` pixels square by default (the VAE's ``sample_size``, b2trl's default resolution for
    the pipeline); any multiple of 4 works. When `output_dir` is given the pipeline is also saved there, and that
    folder loads with `ZImagePipeline.from_pretrained` and [`~b2trl.load_pipeline`].

    Returns:
        The `diffusers.ZImagePipeline`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = qwen_char_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _qwen3(
        tokenizer, vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
    )
    transformer = ZImageTransformer2DModel(
        in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=text_width,
        axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    )
    # random pad tokens, so that a padding mix-up shows in the outputs (diffusers initialises them to zero)
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = tiny_vae(sample_size, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def build_zimage_pipeline(resolution: int = 1024, tiny_width: bool = False, seed: int = 0):
    """
    A `ZImagePipeline` with Z-Image's architecture and random weights (no download), for benchmarks and memory
    measurements.

    The shape follows the published configs of ``Tongyi-MAI/Z-Image-Turbo`` (Z-Image and Z-Image-Turbo share
    it), which are diffusers' defaults of `ZImageTransformer2DModel`; parameter counts are those of this builder on
    ``torch.device("meta")`` with diffusers 0.42.1 and transformers 5.24.0:

    - `ZImageTransformer2DModel` (S3-DiT), **6,154,908,736** parameters (6.15 B): patch 2 over 16 latent
      channels, width 3840 (30 heads x 128, RMS-normed queries and keys, RoPE axes 32/48/48), 30 single-stream
      blocks with adaLN modulation and a SwiGLU feed-forward of 10,240, two noise-refiner blocks on the image tokens
      and two context-refiner blocks on the text, text projected from Qwen3's width 2560;
    - Qwen3-4B as `Qwen3Model` (width 2560, 36 layers, 32 query and 8 key-value heads of 128, MLP 9728, vocabulary
      151,936, no LM head): **4,022,468,096** parameters;
    - `AutoencoderKL` with FLUX.1's shape (16 latent channels, 4 levels of 128/256/512/512 channels, no quantisation
      convolutions, ``scaling_factor`` 0.3611, ``shift_factor`` 0.1159): 83,819,683 parameters;
    - `FlowMatchEulerDiscreteScheduler` with shift 3.0 and no resolution-dependent shift (Z-Image-Turbo's).

    The tokenizer is [`qwen_char_tokenizer`] (ids below 261, inside Qwen3's vocabulary). Build it under
    ``torch.device("cuda")`` to initialise the weights on the GPU, or under ``torch.device("meta")`` for the
    architecture alone.

    Args:
        resolution (`int`, *optional*, defaults to `1024`):
            image side in pixels (latents are 8 times smaller); the pipeline needs a multiple of 16. It is the
            VAE's ``sample_size``, b2trl's default resolution for the pipeline.
        tiny_width (`bool`, *optional*, defaults to `False`):
            Keep the layout (noise and context refiners, single-stream blocks with RMS-normed queries and keys, a
            Qwen3 encoder with grouped key-value heads, a 4-level 16-channel VAE) at narrow widths and few layers,
            so that the same code path runs in seconds on a CPU.
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = qwen_char_tokenizer()
    torch.manual_seed(seed)
    if tiny_width:
        text_shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
        transformer_shape = dict(dim=64, n_layers=3, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
                                 axes_dims=[8, 12, 12], axes_lens=[1024, 128, 128])
        vae_shape = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    else:
        text_shape = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        transformer_shape = dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                                 axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
        vae_shape = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    text_encoder = _qwen3(tokenizer, **text_shape)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, cap_feat_dim=text_shape["hidden_size"],
        qk_norm=True, norm_eps=1e-5, rope_theta=256.0, t_scale=1000.0, **transformer_shape,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        sample_size=resolution,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        **vae_shape,
    )
    with torch.device("cpu"):  # the scheduler keeps its sigmas on the CPU, which a meta-device build cannot copy to
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
