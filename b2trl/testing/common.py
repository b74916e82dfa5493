"""What the config-built pipelines share: offline tokenizers, the DDIM scheduler, pipeline assembly."""

from __future__ import annotations

import json
import os
import tempfile

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



def t5_char_tokenizer(model_max_length: int = 16):
    """
    A T5 tokenizer (Unigram over single printable characters, no sentinel ids) that loads offline: ``<pad>``,
    ``</s>`` and ``<unk>`` are ids 0-2 as in T5, words start with ``▁`` and every sequence ends with ``</s>``.
    """
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
