"""Qwen-Image pipelines built from configs: the tiny test pipeline and Qwen-Image's real shape (random weights)."""

from __future__ import annotations

import re
from typing import Optional

import torch

# the Qwen2.5-VL tokens besides <|endoftext|>: the chat template's markers, then the vision markers the model's
# config names (image, video, vision start and end)
_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _byte_level_alphabet() -> list[str]:
    """The printable stand-in of each byte 0-255, in byte order, as byte-level BPE (GPT-2, Qwen) writes bytes."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def _pipeline_template() -> tuple[str, int]:
    """`QwenImagePipeline`'s prompt template and how many of its leading tokens the pipeline drops."""
    from diffusers import QwenImagePipeline

    empty = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return empty.prompt_template_encode, empty.prompt_template_encode_start_idx


def qwen_tokenizer():
    """
    A `Qwen2Tokenizer` that loads offline: byte-level BPE over the 256 bytes, ``<|endoftext|>`` (padding), the chat
    and vision special tokens, and merges for exactly the words of `QwenImagePipeline`'s prompt template. The
    template's system part is then one token per word, punctuation mark and special token, as with Qwen's own
    tokenizer: 34 tokens, the number the pipeline drops. A prompt is mostly single bytes.
    """
    from transformers import Qwen2Tokenizer

    template, drop = _pipeline_template()
    vocab = {char: i for i, char in enumerate(_byte_level_alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    pre_tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=[]).backend_tokenizer.pre_tokenizer
    merges = []
    for segment in re.split("|".join(map(re.escape, _SPECIAL_TOKENS + ("{}",))), template):
        for piece, _ in pre_tokenizer.pre_tokenize_str(segment):
            # merge each piece left to right into one token
            for end in range(2, len(piece) + 1):
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab.setdefault(piece[:end], len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=list(dict.fromkeys(merges)), additional_special_tokens=list(_SPECIAL_TOKENS)
    )
    prefix = len(tokenizer(template.split("{}")[0]).input_ids)
    if prefix != drop:  # the pipeline would keep part of the system prompt, or drop part of the user's
        raise RuntimeError(f"the template's system part is {prefix} tokens, but QwenImagePipeline drops {drop}")
    return tokenizer


def _text_encoder(tokenizer, *, hidden_size: int, intermediate_size: int, layers: int, heads: int, kv_heads: int,
                  vocab_size: int, vision: dict, mrope_section: list[int]):
    """A `Qwen2_5_VLForConditionalGeneration` (language model, vision tower and LM head) whose special-token ids
    are `tokenizer`'s."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(_SPECIAL_TOKENS))))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "rope_theta": 1000000.0},
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=vision,
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def qwenimage_scheduler():
    """Qwen-Image's `FlowMatchEulerDiscreteScheduler`: shifted by the image's size (``use_dynamic_shifting``,
    exponential, 0.5 at 256 packed tokens to 0.9 at 8192), stretched to end at sigma 0.02."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with torch.device("cpu"):  # the scheduler keeps its sigmas on the CPU, which a meta-device build cannot copy to
        return FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=8192,
            max_shift=0.9,
            shift=1.0,
            shift_terminal=0.02,
            time_shift_type="exponential",
            use_dynamic_shifting=True,
        )


def build_tiny_qwenimage_pipeline(output_dir: Optional[str] = None, *, seed: int = 0, text_width: int = 32):
    """
    Build a randomly initialised `QwenImagePipeline` small enough for CPU tests.

    It has Qwen-Image's structure at tiny width: a `Qwen2_5_VLForConditionalGeneration` text encoder (2 layers of
    width `text_width`, grouped-query attention, multimodal rotary sections, a one-block vision tower that text
    prompts never use) with [`qwen_tokenizer`], a dual-stream `QwenImageTransformer2DModel` (2 blocks of 2 heads
    x 16, RMS-normed queries and keys, 3-axis RoPE) over 16 latent channels in 2x2 patches, an
    `AutoencoderKLQwenImage` with one spatial downsampling (scale factor 2; Qwen-Image's has 8) and the VAE's
    default per-channel ``latents_mean``/``latents_std``, and Qwen-Image's scheduler ([`qwenimage_scheduler`]).
    Its pipeline default size is 256 px; pass a resolution (a multiple of 4, e.g. 16) to sample small images.
    Like `QwenImagePipeline` itself, it holds no image processor: text prompts need only the tokenizer.
    When `output_dir` is given the pipeline is also saved there, and that folder loads with
    `QwenImagePipeline.from_pretrained` and [`~b2trl.load_pipeline`].

    Returns:
        The `diffusers.QwenImagePipeline`.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(
        tokenizer, hidden_size=text_width, intermediate_size=2 * text_width, layers=2, heads=2, kv_heads=1,
        vocab_size=len(tokenizer), mrope_section=[2, 3, 3],  # a head of 16: 8 rotary frequencies
        vision=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text_width,
                    fullatt_block_indexes=[0]),
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_width, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    pipe = QwenImagePipeline(
        scheduler=qwenimage_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def build_qwenimage_pipeline(resolution: int = 1024, tiny_width: bool = False, seed: int = 0,
                             dtype: Optional[torch.dtype] = None):
    """
    A `QwenImagePipeline` with Qwen-Image's architecture and random weights (no download), for the cost benchmark
    and memory measurements.

    The shape follows the published configs of ``Qwen/Qwen-Image`` (its ``transformer``, ``vae`` and
    ``text_encoder`` configs, which are diffusers' `QwenImageTransformer2DModel` and `AutoencoderKLQwenImage`
    defaults and Qwen2.5-VL-7B-Instruct); parameter counts are those of this builder on ``torch.device("meta")``
    with diffusers 0.42.1 and transformers 5.24.0:

    - `QwenImageTransformer2DModel`, **20,430,401,088** parameters (20.4 B): 60 dual-stream blocks of 24 heads
      x 128 (width 3072) with RMS-normed queries and keys and 3-axis RoPE (16, 56, 56), over 16 latent channels in
      2x2 patches (``in_channels`` 64), text projected from width 3584;
    - `AutoencoderKLQwenImage` (base width 96, multipliers 1/2/4/4, 8x spatial downsampling, 16 latent channels):
      126,892,531 parameters;
    - `Qwen2_5_VLForConditionalGeneration` (Qwen2.5-VL-7B-Instruct's shape): **8,292,166,656** parameters, of
      which the language model (28 layers of width 3584, 28 query and 4 key-value heads, MLP 18944, vocabulary
      152,064) holds 7,070,619,136, its LM head 544,997,376 and the vision tower (32 blocks of width 1280, unused
      for text prompts) 676,550,144;
    - Qwen-Image's scheduler ([`qwenimage_scheduler`]).

    The tokenizer is [`qwen_tokenizer`] (ids below 400, inside the 152,064-token vocabulary). The pipeline's
    ``default_sample_size`` is set to `resolution` / 8, so the pipeline, and b2trl without a ``resolution``,
    sample `resolution`-pixel images.

    Build it under ``torch.device("cuda")`` to initialise the weights on the GPU (with ``dtype=torch.bfloat16``:
    the whole pipeline is 57 GB in bf16 and twice that in float32), or under ``torch.device("meta")`` for the
    architecture alone.

    Args:
        resolution (`int`, *optional*, defaults to `1024`): image side in pixels; a multiple of 16.
        tiny_width (`bool`, *optional*, defaults to `False`):
            Keep the layout (dual-stream blocks with 3-axis RoPE, a Qwen2.5-VL text encoder with grouped-query
            attention and a vision tower, an 8x VAE with 16 latent channels) at narrow widths and few layers, so
            that the same code path runs in seconds on a CPU.
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.
        dtype (`torch.dtype`, *optional*): dtype the weights are created in (default: torch's default, float32).
    """
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    if resolution < 16 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16 (8x VAE, then 2x2 patches), got {resolution}.")
    tokenizer = qwen_tokenizer()
    if tiny_width:
        text = dict(hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2, vocab_size=len(tokenizer),
                    mrope_section=[2, 3, 3])
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
        transformer_shape = dict(num_layers=3, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                 axes_dims_rope=(8, 12, 12))
        vae_shape = dict(base_dim=16)
    else:
        text = dict(hidden_size=3584, intermediate_size=18944, layers=28, heads=28, kv_heads=4, vocab_size=152064,
                    mrope_section=[16, 24, 24])
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        transformer_shape = {}  # diffusers' defaults are Qwen-Image's
        vae_shape = {}
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        text_encoder = _text_encoder(tokenizer, vision=vision, **text)
        transformer = QwenImageTransformer2DModel(**transformer_shape)
        vae = AutoencoderKLQwenImage(**vae_shape)
    finally:
        torch.set_default_dtype(previous)
    pipe = QwenImagePipeline(
        scheduler=qwenimage_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = resolution // pipe.vae_scale_factor
    return pipe
