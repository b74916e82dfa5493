"""Reward functions without model weights: JPEG, composite, registry, input checks, torch preprocessing."""

import subprocess
import sys

import pytest
import torch

from b2trl.rewards import (
    CompositeReward,
    JpegCompressibility,
    JpegIncompressibility,
    get_reward,
    list_rewards,
    register_reward,
)
from b2trl.rewards.base import ClipImageSpec, check_reward_inputs, clip_preprocess

try:
    import reward_helpers
except ImportError:  # tests collected as a package
    from tests import reward_helpers


def flat_and_noise(size=64):
    flat = torch.full((1, 3, size, size), 0.5)
    noise = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noise])


# ----------------------------------------------------------------------------------------------- import


def test_import_is_light():
    code = "import sys, b2trl.rewards; print('trl' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------------- JPEG


def test_jpeg_flat_image_more_compressible_than_noise():
    images = flat_and_noise()
    rewards, meta = JpegCompressibility()(images, ["a", "b"], [{}, {}])
    assert rewards.dtype == torch.float32 and rewards.shape == (2,)
    assert rewards[0] > rewards[1]  # flat compresses better
    assert torch.equal(meta["jpeg_kb"], -rewards)
    inc, _ = JpegIncompressibility()(images, ["a", "b"], [{}, {}])
    assert inc[1] > inc[0]
    assert torch.allclose(inc, -rewards)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_jpeg_low_precision_in_float32_out(dtype):
    images = flat_and_noise()
    rewards, _ = JpegIncompressibility()(images.to(dtype), ["a", "b"], None)
    assert rewards.dtype == torch.float32
    ref, _ = JpegIncompressibility()(images.to(dtype).float(), ["a", "b"], None)
    assert torch.equal(rewards, ref)


def test_jpeg_batch_invariance():
    images = flat_and_noise()
    batch, _ = JpegIncompressibility()(images, ["a", "b"], None)
    single = torch.cat([JpegIncompressibility()(images[i : i + 1], ["a"], None)[0] for i in range(2)])
    assert torch.equal(batch, single)


def test_jpeg_quality_is_checked():
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


# ------------------------------------------------------------------------------------------ input checks


def test_images_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"`images` must be in \[0, 1\]"):
        JpegCompressibility()(torch.full((1, 3, 8, 8), 2.0), ["a"], None)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        check_reward_inputs(torch.full((1, 3, 8, 8), -1.0), ["a"])


def test_small_overshoot_tolerated_and_clamped():
    images = torch.full((1, 3, 8, 8), 1.0005)
    assert check_reward_inputs(images, ["a"]).max() == 1.0


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 4, 8, 8), (1, 8, 8, 3)])
def test_wrong_shape_rejected(shape):
    with pytest.raises(ValueError, match=r"`images` must have shape \(B, 3, H, W\)"):
        check_reward_inputs(torch.rand(shape), ["a"])


def test_wrong_types_rejected():
    with pytest.raises(TypeError, match="`images` must be a torch.Tensor"):
        check_reward_inputs([[0.5]], ["a"])
    with pytest.raises(TypeError, match="floating-point"):
        check_reward_inputs(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"])
    with pytest.raises(TypeError, match="not a single string"):
        check_reward_inputs(torch.rand(1, 3, 8, 8), "a")


def test_prompt_count_mismatch_rejected():
    with pytest.raises(ValueError, match="`prompts` has 1 entries but `images` has 2"):
        JpegCompressibility()(torch.rand(2, 3, 8, 8), ["a"], None)
    with pytest.raises(ValueError, match="`prompt_metadata` has 3 entries"):
        check_reward_inputs(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}, {}])


# ---------------------------------------------------------------------------------------- preprocessing


def _smooth_uint8(height, width, seed=0):
    low = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    return (image[0] * 255).round().to(torch.uint8)


@pytest.mark.parametrize("height,width,size", [(64, 64, 32), (50, 70, 32), (96, 64, 32), (20, 20, 32), (96, 144, 56)])
def test_torch_preprocessing_matches_transformers(height, width, size):
    # Reference: transformers' CLIP image processor (its PIL backend here: no torchvision). PIL resizes uint8
    # images in two separable passes and rounds (and clips) to uint8 after each, while torch keeps float32
    # throughout. On smooth images that costs at most about one uint8 level: 1/255/std ~ 0.015 in normalised
    # units, so we allow 0.02 per pixel and 0.006 on average (half a level).
    processor = reward_helpers.image_processor_class()(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    image = _smooth_uint8(height, width)
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    spec = ClipImageSpec.from_processor_config(processor.to_dict(), size)
    ours = clip_preprocess(image[None].float() / 255, spec)
    assert ours.shape == reference.shape == (1, 3, size, size)
    diff = (ours - reference).abs()
    assert diff.max() < 0.02 and diff.mean() < 0.006


def test_torch_preprocessing_on_noise_close_on_average():
    # On white noise the bicubic kernel overshoots, and PIL clips after its first pass whereas torch clips once
    # at the end: single pixels can then differ by ~0.2, so only the mean difference is meaningful here.
    processor_class = reward_helpers.image_processor_class()
    processor = processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = (torch.rand(3, 80, 60, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8)
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(image[None].float() / 255, ClipImageSpec.from_processor_config(processor.to_dict(), 32))
    assert (ours - reference).abs().mean() < 0.01


def test_preprocessing_spec_defaults_and_fixed_size():
    spec = ClipImageSpec.from_processor_config(None, image_size=48)
    assert spec.shortest_edge == 48 and spec.crop_size == (48, 48) and spec.interpolation == "bicubic"
    spec = ClipImageSpec.from_processor_config({"size": {"height": 20, "width": 30}, "do_center_crop": False}, 224)
    assert clip_preprocess(torch.rand(2, 3, 40, 40), spec).shape == (2, 3, 20, 30)


# -------------------------------------------------------------------------------------------- composite


def test_composite_weights_and_components():
    images = flat_and_noise()
    comp = CompositeReward({"jpeg_incompressibility": 2.0, reward_helpers.brightness_reward: -1.0})
    rewards, meta = comp(images, ["a", "b"], [{}, {}])
    jpeg, _ = JpegIncompressibility()(images, ["a", "b"], None)
    bright = images.mean(dim=(1, 2, 3))
    assert rewards.dtype == torch.float32 and rewards.shape == (2,)
    assert set(meta["components"]) == {"jpeg_incompressibility", "brightness_reward"}
    assert torch.allclose(meta["components"]["jpeg_incompressibility"], jpeg)
    assert torch.allclose(meta["components"]["brightness_reward"], bright)
    assert all(v.dtype == torch.float32 and v.shape == (2,) for v in meta["components"].values())
    assert meta["weights"] == {"jpeg_incompressibility": 2.0, "brightness_reward": -1.0}
    assert torch.allclose(rewards, 2.0 * jpeg - bright)
    assert meta["parts"]["jpeg_incompressibility"]["jpeg_kb"].shape == (2,)


def test_composite_user_callables_lists_and_duplicate_names():
    scorer = reward_helpers.ConstantReward(3.0)
    comp = CompositeReward(
        {scorer: 1.0, reward_helpers.ConstantReward(1.0): 0.5, reward_helpers.prompt_length_reward: 1}
    )
    rewards, meta = comp(torch.rand(2, 3, 8, 8), ["ab", "abcd"], None)
    assert list(meta["components"]) == ["ConstantReward", "ConstantReward_1", "prompt_length_reward"]
    assert torch.allclose(rewards, torch.tensor([3.0 + 0.5 + 2.0, 3.0 + 0.5 + 4.0]))


def test_composite_normalize_uses_running_mean_and_std():
    comp = CompositeReward({reward_helpers.prompt_length_reward: 2.0}, normalize=True)
    images = torch.rand(2, 3, 8, 8)
    seen = []
    for prompts in (["a", "abc"], ["abcdef", "ab"]):
        rewards, meta = comp(images, prompts, None)
        seen += [float(len(p)) for p in prompts]
        history = torch.tensor(seen, dtype=torch.float64)
        mean, std = history.mean(), history.std(unbiased=False)
        raw = torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)
        expected = ((raw - mean) / (std + comp.eps)).float()
        assert torch.allclose(meta["normalized"]["prompt_length_reward"], expected, atol=1e-6)
        assert torch.allclose(rewards, 2.0 * expected, atol=1e-6)
        assert torch.equal(meta["components"]["prompt_length_reward"], raw.float())  # raw, not normalised
    assert comp.stats["prompt_length_reward"].count == 4


def test_composite_bad_part_output_and_arguments():
    bad = CompositeReward({lambda images, prompts, metadata: (torch.zeros(3), {}): 1.0})
    with pytest.raises(ValueError, match=r"returned rewards of shape \(3,\), expected \(2,\)"):
        bad(torch.rand(2, 3, 8, 8), ["a", "b"], None)
    with pytest.raises(TypeError, match="non-empty dict"):
        CompositeReward({})
    with pytest.raises(TypeError, match="must be a number"):
        CompositeReward({"jpeg_compressibility": "heavy"})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        CompositeReward({"nope": 1.0})


# --------------------------------------------------------------------------------------------- registry


def test_builtin_names_listed_and_resolved():
    builtins = {
        "jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clip_score", "pickscore", "toy_alignment",
        "hpsv2", "vqa_score", "remote",
    }
    assert builtins <= set(list_rewards())
    assert isinstance(get_reward("jpeg_compressibility"), JpegCompressibility)
    assert get_reward("jpeg_incompressibility", quality=80).quality == 80
    # the model-based scorers (which check at construction that their model can be found) and the remote client
    # (which checks that its server answers) are tested in test_rewards_clip/hps/vqa/remote.py


def test_module_function_and_class():
    module = reward_helpers.__name__
    fn = get_reward(f"{module}:brightness_reward")
    assert fn is reward_helpers.brightness_reward
    scaled = get_reward(f"{module}:prompt_length_reward", scale=2.0)
    assert scaled(torch.rand(1, 3, 4, 4), ["abc"], None)[0] == [6.0]
    const = get_reward(f"{module}:ConstantReward", value=4.0)
    assert isinstance(const, reward_helpers.ConstantReward) and const.value == 4.0


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'\. Known rewards: aesthetic, clip_score"):
        get_reward("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward(f"{reward_helpers.__name__}:missing")


def test_register_reward(monkeypatch):
    from b2trl.rewards import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the global registry clean

    @register_reward("test_half_brightness")
    def half_brightness(images, prompts, prompt_metadata):
        return images.float().mean(dim=(1, 2, 3)) / 2, {}

    assert "test_half_brightness" in list_rewards()
    assert get_reward("test_half_brightness") is half_brightness
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_half_brightness")(reward_helpers.brightness_reward)
    register_reward("test_half_brightness", overwrite=True)(reward_helpers.brightness_reward)
    assert get_reward("test_half_brightness") is reward_helpers.brightness_reward
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b")
    comp = CompositeReward({"test_half_brightness": 1.0})
    assert "test_half_brightness" in comp(torch.rand(1, 3, 4, 4), ["a"], None)[1]["components"]


def test_callable_passes_through():
    assert get_reward(reward_helpers.brightness_reward) is reward_helpers.brightness_reward
