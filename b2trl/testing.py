"""Tiny Stable Diffusion pipelines built from configs, for tests and smoke runs (random weights, no downloads)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch


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
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
            vocab_size=514,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=model_max_length,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_char_tokenizer(tmp, model_max_length)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe
