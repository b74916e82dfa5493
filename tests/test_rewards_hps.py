"""HPSv2: the open_clip -> transformers CLIP conversion, checked against an independent forward of open_clip's
architecture written from its state-dict layout, on a tiny random checkpoint (offline)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from b2trl.rewards import HPSv2, RewardModelNotFoundError, get_reward
from b2trl.rewards.base import clip_preprocess
from b2trl.rewards.hps import convert_open_clip_state_dict, load_open_clip_checkpoint
from b2trl.rewards.testing import build_tiny_open_clip

PROMPTS = ["a photo of a cat", "a red car", "an oil painting of a lighthouse at dusk"]
HEADS = 4


# ----------------------------------------------------------------------------- reference open_clip forward


def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def _block(x, state, p, mask=None):
    # open_clip ResidualAttentionBlock: pre-norm, nn.MultiheadAttention with a fused in-projection, GELU MLP
    batch, length, width = x.shape
    h = _ln(x, state, f"{p}.ln_1")
    q, k, v = (h @ state[f"{p}.attn.in_proj_weight"].T + state[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, HEADS, width // HEADS).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // HEADS)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ state[f"{p}.attn.out_proj.weight"].T + state[f"{p}.attn.out_proj.bias"]
    h = _ln(x, state, f"{p}.ln_2")
    h = F.gelu(h @ state[f"{p}.mlp.c_fc.weight"].T + state[f"{p}.mlp.c_fc.bias"])  # exact GELU (not quick_gelu)
    return x + h @ state[f"{p}.mlp.c_proj.weight"].T + state[f"{p}.mlp.c_proj.bias"]


def _layers(state, prefix):
    depth = len(prefix.split(".")) + 1  # position of the block index in the key
    return sorted({int(k.split(".")[depth]) for k in state if k.startswith(f"{prefix}transformer.")})


def reference_image_features(state, pixels):
    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = _ln(x, state, "visual.ln_pre")
    for i in _layers(state, "visual."):
        x = _block(x, state, f"visual.transformer.resblocks.{i}")
    return _ln(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]


def reference_text_features(state, ids):
    # open_clip pads with 0 to the context length, runs a causal transformer and pools at the highest id (end of text)
    length = state["positional_embedding"].shape[0]
    ids = F.pad(ids, (0, length - ids.shape[1]))
    x = state["token_embedding.weight"][ids] + state["positional_embedding"]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in _layers(state, ""):
        x = _block(x, state, f"transformer.resblocks.{i}", mask)
    x = _ln(x, state, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ state["text_projection"]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    return build_tiny_open_clip(str(tmp_path_factory.mktemp("tiny-hps")))


@pytest.fixture(scope="module")
def scorer(tiny_hps):
    path, processor, _ = tiny_hps
    return HPSv2(path, processor_name_or_path=processor).to("cpu")


@pytest.fixture
def images():
    return torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))


def _token_ids(tokenizer, prompts):
    # byte-level tokens: the longest prompt is cut to the 24-token context, keeping its end-of-text token
    return tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=24)["input_ids"]


# ------------------------------------------------------------------------------------------------- tests


def test_converted_embeddings_equal_open_clip_reference(scorer, tiny_hps, images):
    _, _, state = tiny_hps
    pixels = clip_preprocess(images, scorer.image_spec)
    model = scorer.model
    with torch.no_grad():
        ours_image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        ours_text = model.get_text_features(**tokens).pooler_output
    ref_image = reference_image_features(state, pixels)
    ref_text = reference_text_features(state, _token_ids(scorer.tokenizer, PROMPTS))
    assert torch.allclose(ours_image, ref_image, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours_text, ref_text, atol=1e-5, rtol=1e-5)
    # the test is not vacuous: embeddings differ between inputs
    assert (ref_image[0] - ref_image[1]).abs().max() > 1e-2 and (ref_text[0] - ref_text[1]).abs().max() > 1e-2


def test_hps_score_is_the_cosine_of_reference_features(scorer, tiny_hps, images):
    _, _, state = tiny_hps
    rewards, meta = scorer(images, PROMPTS, [{}] * 3)
    pixels = clip_preprocess(images, scorer.image_spec)
    expected = F.cosine_similarity(
        reference_image_features(state, pixels), reference_text_features(state, _token_ids(scorer.tokenizer, PROMPTS))
    )
    assert rewards.dtype == torch.float32 and rewards.shape == (3,) and meta == {}
    assert torch.allclose(rewards, expected, atol=1e-5)


def test_batched_equals_one_by_one_and_inputs_matter(scorer, images):
    rewards, _ = scorer(images, PROMPTS, None)
    singles = torch.cat([scorer(images[i : i + 1], PROMPTS[i : i + 1], None)[0] for i in range(3)])
    assert torch.allclose(rewards, singles, atol=1e-6)
    assert not torch.allclose(rewards, scorer(images, PROMPTS[::-1], None)[0], atol=1e-4)
    assert not torch.allclose(rewards, scorer(images.flip(0), PROMPTS, None)[0], atol=1e-4)


def test_bf16_weights(tiny_hps, scorer, images):
    path, processor, _ = tiny_hps
    half = HPSv2(path, processor_name_or_path=processor, dtype="bfloat16").to("cpu")
    assert half.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    rewards, _ = half(images, PROMPTS, None)
    assert rewards.dtype == torch.float32
    assert torch.allclose(rewards, scorer(images, PROMPTS, None)[0], atol=0.05)


def test_folder_file_and_module_prefix_load_the_same_weights(tmp_path, tiny_hps, scorer, images):
    path, processor, state = tiny_hps
    folder_scorer = HPSv2(os.path.dirname(path), filename="open_clip.pt", processor_name_or_path=processor)
    expected, _ = scorer(images, PROMPTS, None)
    assert torch.allclose(folder_scorer(images, PROMPTS, None)[0], expected)
    prefixed, _, _ = build_tiny_open_clip(str(tmp_path), module_prefix=True)
    assert all(k.startswith("module.") for k in torch.load(prefixed, weights_only=True)["state_dict"])
    assert torch.allclose(HPSv2(prefixed, processor_name_or_path=processor)(images, PROMPTS, None)[0], expected)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)  # a bare state dict, without the training checkpoint's wrapping
    assert set(load_open_clip_checkpoint(str(bare))) == set(state)


def test_conversion_splits_fused_attention_and_transposes_projections(tiny_hps):
    _, _, state = tiny_hps
    converted = convert_open_clip_state_dict(state)
    fused = state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    width = fused.shape[1]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        part = converted[f"vision_model.encoder.layers.1.self_attn.{name}.weight"]
        assert torch.equal(part, fused[j * width : (j + 1) * width])
    assert torch.equal(converted["text_projection.weight"], state["text_projection"].T)
    assert torch.equal(converted["visual_projection.weight"], state["visual.proj"].T)
    # the causal-mask buffer older open_clip versions saved is dropped, not reported
    assert "attn_mask" not in convert_open_clip_state_dict({**state, "attn_mask": torch.zeros(2, 2)})


def test_unknown_keys_and_mismatched_config_are_named(tmp_path, tiny_hps):
    _, processor, state = tiny_hps
    with pytest.raises(ValueError, match=r"unexpected keys visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_open_clip_state_dict({**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})
    with pytest.raises(ValueError, match="unexpected keys logit_bias"):
        convert_open_clip_state_dict({**state, "logit_bias": torch.zeros(())})
    bigger, _, _ = build_tiny_open_clip(str(tmp_path), width=48, heads=4)
    with pytest.raises(ValueError, match=r"(?s)do not fit the CLIP config.*wrong shape.*\(48,\) vs config \(32,\)"):
        HPSv2(bigger, processor_name_or_path=processor).to("cpu")
    deeper, _, _ = build_tiny_open_clip(str(tmp_path / "deeper"), layers=3)
    with pytest.raises(ValueError, match=r"unexpected: .*layers\.2\."):
        HPSv2(deeper, processor_name_or_path=processor).to("cpu")


def test_pickled_objects_are_refused_with_a_fix(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": {}, "args": _Opaque()}, path)
    with pytest.raises(ValueError, match=r"(?s)weights_only=True\) refuses.*_Opaque"):
        load_open_clip_checkpoint(str(path))


class _Opaque:
    pass


def test_registry_and_fail_fast_on_missing_weights(tmp_path, tiny_hps, monkeypatch):
    import huggingface_hub.constants

    path, processor, _ = tiny_hps
    built = get_reward("hpsv2", model_name_or_path=path, processor_name_or_path=processor)
    assert isinstance(built, HPSv2) and built.model is None  # lazy
    missing = str(tmp_path / "nowhere" / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardModelNotFoundError, match=f"`model_name_or_path`='{missing}'.*does not exist"):
        get_reward("hpsv2", model_name_or_path=missing, processor_name_or_path=processor)
    with pytest.raises(RewardModelNotFoundError, match="has no 'HPS_v2.1_compressed.pt'.*set `filename=`"):
        get_reward("hpsv2", model_name_or_path=str(tmp_path), processor_name_or_path=processor)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RewardModelNotFoundError, match="'xswu/HPSv2' is not in the Hugging Face cache"):
        get_reward("hpsv2")
    with pytest.raises(RewardModelNotFoundError, match="`processor_name_or_path`='laion/CLIP-ViT-H-14"):
        get_reward("hpsv2", model_name_or_path=path)
