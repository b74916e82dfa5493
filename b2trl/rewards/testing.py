"""Tiny, randomly initialised CLIP models and aesthetic heads for offline tests and benchmarks.

The scores they give are meaningless; they exercise the loading, preprocessing and batching code paths of
the CLIP scorers without downloading any weights.
"""

import os

import torch


def build_tiny_clip(folder, image_size=32, projection_dim=16, patch_size=8, seed=0, with_processor=True):
    """Save a randomly initialised, tiny `CLIPModel` plus a byte-level CLIP tokenizer to `folder`.

    The tokenizer has no merges: its vocabulary is the 256 byte symbols, each also with the end-of-word
    suffix, which is enough for CLIP's BPE to encode any text offline.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if with_processor:
        image_processor_class()(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ).save_pretrained(folder)
    return folder


def image_processor_class():
    """transformers' CLIP image processor that runs here (the PIL one: torchvision is not installed)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def save_aesthetic_head(path, input_dim=16, seed=0):
    """Save a random aesthetic head state dict in the LAION key layout; returns the state dict."""
    gen = torch.Generator().manual_seed(seed)
    dims = [(0, input_dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for index, d_in, d_out in dims:
        state[f"layers.{index}.weight"] = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(d_out, generator=gen) * 0.1
    torch.save(state, path)
    return state
