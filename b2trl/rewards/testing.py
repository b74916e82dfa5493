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


def build_tiny_open_clip(folder, image_size=32, patch_size=8, width=32, layers=2, heads=4, embed_dim=16,
                         context_length=24, seed=0, module_prefix=False):
    """Save a random open_clip-layout ViT CLIP checkpoint as HPSv2 distributes it, plus its processor folder.

    `folder/open_clip.pt` holds `{"state_dict": ..., "epoch": 1}` with open_clip's key names (`visual.conv1.weight`,
    `visual.transformer.resblocks.{i}.attn.in_proj_weight`, `token_embedding.weight`, `text_projection`, ...;
    prefixed with `module.` if `module_prefix`). `folder/processor` holds what HPSv2 takes from the LAION CLIP repo:
    a `config.json` of the matching transformers `CLIPConfig` (GELU, as ViT-H-14; `eos_token_id=2` as in that repo,
    which selects pooling at the highest token id), a byte-level CLIP tokenizer whose end-of-text token has the
    highest id (as in CLIP's real vocabulary) and a `preprocessor_config.json`.

    Returns:
        `tuple(str, str, dict)`: the checkpoint path, the processor folder and the open_clip state dict.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {}
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    processor = os.path.join(folder, "processor")
    os.makedirs(processor, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(processor)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                 hidden_act="gelu")
    CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=context_length, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1, **tower),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=embed_dim,
    ).save_pretrained(processor)
    image_processor_class()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(processor)

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=gen) * (scale if scale is not None else shape[-1] ** -0.5)

    def layer_norm(prefix):
        return {f"{prefix}.weight": 1 + 0.1 * rand(width, scale=1.0), f"{prefix}.bias": 0.1 * rand(width, scale=1.0)}

    def blocks(prefix):
        state = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}"
            state.update(layer_norm(f"{p}.ln_1"))
            state.update(layer_norm(f"{p}.ln_2"))
            state[f"{p}.attn.in_proj_weight"] = rand(3 * width, width)
            state[f"{p}.attn.in_proj_bias"] = rand(3 * width, scale=0.1)
            state[f"{p}.attn.out_proj.weight"] = rand(width, width)
            state[f"{p}.attn.out_proj.bias"] = rand(width, scale=0.1)
            state[f"{p}.mlp.c_fc.weight"] = rand(4 * width, width)
            state[f"{p}.mlp.c_fc.bias"] = rand(4 * width, scale=0.1)
            state[f"{p}.mlp.c_proj.weight"] = rand(width, 4 * width)
            state[f"{p}.mlp.c_proj.bias"] = rand(width, scale=0.1)
        return state

    grid = image_size // patch_size
    state = {
        "visual.conv1.weight": rand(width, 3, patch_size, patch_size, scale=(3 * patch_size**2) ** -0.5),
        "visual.class_embedding": rand(width, scale=1.0),
        "visual.positional_embedding": rand(grid**2 + 1, width, scale=0.5),
        **layer_norm("visual.ln_pre"),
        **blocks("visual."),
        **layer_norm("visual.ln_post"),
        "visual.proj": rand(width, embed_dim),
        "token_embedding.weight": rand(len(vocab), width, scale=1.0),
        "positional_embedding": rand(context_length, width, scale=0.5),
        **blocks(""),
        **layer_norm("ln_final"),
        "text_projection": rand(width, embed_dim),
        "logit_scale": torch.tensor(4.6052),
    }
    saved = {f"module.{k}" if module_prefix else k: v for k, v in state.items()}
    path = os.path.join(folder, "open_clip.pt")
    torch.save({"state_dict": saved, "epoch": 1}, path)
    return path, processor, state


# A chat template in the style of Qwen's (ChatML): enough for the processors to place the image placeholder.
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ image_placeholder }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer(special_tokens, words=("Yes", "No")):
    """A byte-level BPE tokenizer built offline: the 256 byte symbols, merges that make each of `words` one token
    (as "Yes"/"No" are in real VLM vocabularies), and `special_tokens` after them, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    merges = []
    for word in words:
        for end in range(2, len(word) + 1):
            merges.append((word[: end - 1], word[end - 1]))
            vocab.setdefault(word[:end], len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def build_tiny_vlm(folder, arch="qwen2_5_vl", seed=0, init_range=0.3):
    """Save a tiny random instruction-VLM (model, processor, tokenizer, chat template) that
    `AutoModelForImageTextToText` and `AutoProcessor` load from `folder`, for offline tests of [`VQAScore`].

    `arch="qwen2_5_vl"` builds a Qwen2.5-VL (whose processor declares a video processor, so without torchvision it
    loads through the images-only fallback); `arch="llava"` builds a LLaVA with a CLIP vision tower and a Llama
    language model (its processor has no video part). Weights are drawn with a large `init_range` so that the
    next-token distribution depends visibly on the image and the text.
    """
    import json

    import transformers

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>"]
        tokenizer = build_byte_tokenizer(special)
        tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                initializer_range=init_range,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                initializer_range=init_range,
            ),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
        image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        processor_class = "Qwen2_5_VLProcessor"
    elif arch == "llava":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        tokenizer = build_byte_tokenizer(special)
        tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
        config = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
                               initializer_range=init_range),
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, initializer_range=init_range,
                             bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                             pad_token_id=ids["<|endoftext|>"]),
            image_token_index=ids["<image>"], image_seq_length=16, vision_feature_select_strategy="default",
            initializer_range=init_range,
        )
        model = transformers.LlavaForConditionalGeneration(config)
        image_processor = image_processor_class()(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        placeholder = "<image>"
        processor_class = "LlavaProcessor"
    else:
        raise ValueError(f"`arch` must be 'qwen2_5_vl' or 'llava', got {arch!r}.")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    processor_config = {"processor_class": processor_class}
    if arch == "llava":
        processor_config.update(patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump(processor_config, f)
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(_CHATML_TEMPLATE.replace("{{ image_placeholder }}", placeholder))
    return folder
