"""What the config-built pipelines share: offline tokenizers, tiny VAE and CLIP configs, and (from the toy
model's architecture) SD1.x's DDIM scheduler and the pipeline assembly."""

from __future__ import annotations

import json
import os
import tempfile

from ..toy.architecture import assemble_pipeline, ddim_scheduler  # noqa: F401  (shared by the builders)

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




def t5_char_tokenizer(model_max_length: int = 16):
    """
    A T5 tokenizer (Unigram over single printable characters, no sentinel ids) that loads offline: ``<pad>``,
    ``</s>`` and ``<unk>`` are ids 0-2 as in T5, words start with ``▁`` and every sequence ends with ``</s>``.
    """
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_vae(sample_size: int, latent_channels: int = 4, **config):
    """The tiny test pipelines' `AutoencoderKL`: two levels of 8 and 16 channels, images of `sample_size` pixels;
    `config` adds or overrides fields (a family's scaling, shift, ``force_upcast``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        **config,
    )


def tiny_clip_config(hidden_size: int, max_length: int, num_hidden_layers: int, **config):
    """A tiny `CLIPTextConfig` over the character tokenizer's vocabulary (its special tokens as BOS/EOS/pad), two
    heads and an MLP twice as wide; `config` adds fields (e.g. ``projection_dim``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_CHAR_EOS + 1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=_CHAR_BOS,
        eos_token_id=_CHAR_EOS,
        pad_token_id=_CHAR_EOS,
        **config,
    )


def clip_shaped_config(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, max_length: int,
                       hidden_act: str, **config):
    """A `CLIPTextConfig` at a real CLIP's shape (CLIP's 49,408-token vocabulary, an MLP four times as wide) whose
    special tokens are the character tokenizer's (it uses the vocabulary's first 514 ids); `config` adds fields
    (e.g. ``projection_dim``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_length,
        hidden_act=hidden_act,
        bos_token_id=_CHAR_BOS,
        eos_token_id=_CHAR_EOS,
        pad_token_id=_CHAR_EOS,
        **config,
    )


def tiny_t5_encoder(tokenizer, d_model: int):
    """A one-layer gated-GELU `T5EncoderModel` of width `d_model` over `tokenizer`'s vocabulary (a tiny stand-in for
    the T5-XXL text encoders of SD3 and FLUX.1)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def t5_encoder(tokenizer, tiny_width: bool, **shape):
    """The `T5EncoderModel` of the real-shape SD3 and FLUX.1 builders: T5 v1.1's layout (gated GELU, 32 relative
    position buckets up to distance 128) at `shape` (``d_model``, ``d_kv``, ``num_heads``, ``d_ff``, ``num_layers``),
    over T5's 32,128-id vocabulary, or only `tokenizer`'s ids at a tiny width."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=32128 if not tiny_width else len(tokenizer),  # T5's vocabulary covers the character ids
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **shape,
        )
    )
