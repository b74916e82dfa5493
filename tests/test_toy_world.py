"""The toy world's data, split and exact reward, checked against its own renderer."""

import numpy as np
import pytest
import torch

from b2trl.toy import alignment_reward, heldout_prompts, is_heldout, parse_prompt, render, train_prompts
from b2trl.toy.world import TEMPLATES, all_train_scenes, sample_train_prompts


@pytest.fixture(scope="module")
def batch():
    prompts = sample_train_prompts(256, np.random.default_rng(7))
    return prompts, torch.from_numpy(render(prompts, seed=3))


def test_prompt_lists_are_deterministic_and_parse():
    assert train_prompts() == train_prompts() and heldout_prompts() == heldout_prompts()
    assert 24 <= len(heldout_prompts()) <= 48
    templates = [parse_prompt(p).template for p in train_prompts()]
    assert templates.count("single") < len(templates) / 4  # RL prompts are mostly two-object scenes
    assert {parse_prompt(p).template for p in heldout_prompts()} == set(TEMPLATES)


def test_split_is_disjoint_on_scenes_not_just_strings():
    held = {parse_prompt(p).key for p in heldout_prompts()}
    assert held.isdisjoint(parse_prompt(p).key for p in train_prompts())
    assert all(is_heldout(p) for p in heldout_prompts())
    # the other phrasing of a held-out relation / binding scene is held out too
    for p in heldout_prompts():
        s = parse_prompt(p)
        if s.template == "relation":
            flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[s.relation]
            (ca, sa), (cb, sb) = s.objects
            assert is_heldout(f"a {cb} {sb} {flip} a {ca} {sa}")
    drawn = sample_train_prompts(5000, np.random.default_rng(0))
    assert not any(is_heldout(p) for p in drawn)
    assert {parse_prompt(p).key for p in drawn}.isdisjoint(held)
    for t in TEMPLATES:
        assert not any(s.key in held for s in all_train_scenes(t))


@pytest.mark.parametrize(
    "bad", ["a red hexagon", "a red circle and a red square", "draw a cat", "", "a red circle near a blue square"]
)
def test_unparseable_prompt_raises_naming_it(bad):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(bad)
    with pytest.raises(ValueError) as err:
        alignment_reward(torch.zeros(1, 3, 32, 32), [bad])
    assert repr(bad) in str(err.value)


def test_ground_truth_scores_high(batch):
    prompts, images = batch
    rewards, meta = alignment_reward(images, prompts)
    assert rewards.dtype == torch.float32 and rewards.shape == (256,)
    assert rewards.mean().item() >= 0.99
    assert len(meta) == 256 and {"colour_a", "shape_a", "template"} <= set(meta[0])
    # held-out scenes are rendered and scored just as well
    held = heldout_prompts()
    assert alignment_reward(torch.from_numpy(render(held, seed=1)), held)[0].mean().item() >= 0.99


def test_wrong_prompts_noise_and_blank_score_low(batch):
    prompts, images = batch
    shuffled = [prompts[i] for i in np.random.default_rng(1).permutation(len(prompts))]
    assert alignment_reward(images, shuffled)[0].mean().item() < 0.5
    noise = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert alignment_reward(noise, prompts)[0].mean().item() < 0.1
    assert alignment_reward(torch.full((4, 3, 32, 32), 0.93), prompts[:4])[0].max().item() == 0.0


def test_binding_swap_scores_lower():
    right, swapped = "a red circle and a blue square", "a blue circle and a red square"
    good = alignment_reward(torch.from_numpy(render([right] * 16, seed=0)), [right] * 16)[0]
    bad = alignment_reward(torch.from_numpy(render([swapped] * 16, seed=0)), [right] * 16)[0]
    assert good.mean() > 0.99 and bad.mean() < 0.6
    # a relation drawn the wrong way round loses exactly the relation attribute
    rel, flipped = "a red circle left of a blue square", "a red circle right of a blue square"
    r, meta = alignment_reward(torch.from_numpy(render([flipped] * 8, seed=0)), [rel] * 8)
    assert all(m["relation"] == 0 and m["colour_a"] == 1 and m["shape_b"] == 1 for m in meta)
    assert torch.allclose(r, torch.full_like(r, 0.8))


def test_extra_objects_are_penalised():
    prompt = "a red circle"
    extra = torch.from_numpy(render(["a red circle and a green square"] * 8, seed=0))
    r, meta = alignment_reward(extra, [prompt] * 8)
    assert all(m["extra_objects"] == 1 for m in meta) and r.max() <= 0.5


def test_dtype_and_device(batch):
    prompts, images = batch
    full = alignment_reward(images, prompts)[0]
    half = alignment_reward(images.to(torch.bfloat16), prompts)[0]
    assert half.dtype == torch.float32 and half.device == images.device
    assert (half - full).abs().mean() < 0.02


def test_render_shape_range_and_determinism():
    a = render(["a cyan triangle below a yellow square", "a green circle"], seed=5)
    assert a.shape == (2, 3, 32, 32) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, render(["a cyan triangle below a yellow square", "a green circle"], seed=5))


def test_components_variant_matches_and_reports_relation_accuracy():
    from b2trl.toy import alignment_reward_with_components

    prompts = ["a red circle", "a red circle left of a blue square", "a cyan square and a green triangle"]
    drawn = ["a red circle", "a red circle right of a blue square", "a cyan square and a green triangle"]
    images = torch.from_numpy(render(drawn, seed=2))
    rewards, meta = alignment_reward_with_components(images, prompts)
    assert torch.equal(rewards, alignment_reward(images, prompts)[0])
    parts = meta["components"]
    assert parts["colour"].shape == (3,) and parts["relation"].tolist() == [0.0]
    assert len(meta["per_image"]) == 3


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, b2trl.toy; print(any(m in sys.modules for m in ('trl', 'diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
