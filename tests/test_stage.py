"""The stage object: what `trainer.last_stage` holds after a stage, in sample order, and the gathered reward parts
the advantage rule sees."""

import numpy as np
import torch

from b2trl.advantages import StageRewards, build_rule
from b2trl.rewards import CompositeReward
from helpers import make_trainer


def _brightness(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}


def _redness(images, prompts, metadata):
    return 1000.0 * images[:, 0].float().mean(dim=(1, 2)), {}  # a part a thousand times the other's scale


def test_last_stage_holds_the_rewards_and_advantages_in_sample_order(tiny_model_dir):
    seen = []

    def reward(images, prompts, metadata):
        values = images.float().mean(dim=(1, 2, 3))
        seen.append((list(prompts), values.clone()))
        return values, {}

    trainer = make_trainer(tiny_model_dir, reward=reward, num_epochs=1, selection_rule="grpo")
    trainer.train()
    stage = trainer.last_stage
    n = trainer.config.num_branches
    # the reward function's outputs, batch after batch, are the stage's rewards in the same order
    prompts = [p for batch, _ in seen for p in batch]
    np.testing.assert_allclose(stage.rewards, torch.cat([v for _, v in seen]).double().numpy(), rtol=1e-6)
    assert list(stage.all_prompts) == prompts and len(stage.rewards) == len(stage.keep) == len(stage.advantages)
    # prompt-major, branch-minor: each group of N consecutive samples is one prompt's branches
    assert all(len(set(prompts[g:g + n])) == 1 for g in range(0, len(prompts), n))
    # the advantages are the rule's, recomputed from the recorded rewards
    again = build_rule(trainer.config)(StageRewards(stage.rewards.reshape(-1, n), stage.all_prompts))
    np.testing.assert_array_equal(stage.advantages, again.advantages.reshape(-1))
    np.testing.assert_array_equal(stage.keep, again.keep.reshape(-1))
    assert stage.stats["samples_kept"] == int(stage.keep.sum())
    # the tensors are released when the stage ends; the arrays and statistics stay
    assert stage.transitions == {} and stage.images is None
    assert trainer.last_stage_stats is stage.stats


def test_per_reward_advantages_see_every_part_of_a_composite_reward(tiny_model_dir):
    reward = CompositeReward({_brightness: 1.0, _redness: 1.0})
    trainer = make_trainer(tiny_model_dir, reward=reward, num_epochs=1, selection_rule="grpo",
                           advantage_per_reward=True)
    trainer.train()
    stage = trainer.last_stage
    assert set(stage.reward_components) == {"_brightness", "_redness"}
    assert stage.reward_weights == {"_brightness": 1.0, "_redness": 1.0}
    np.testing.assert_allclose(stage.reward_components["_brightness"] + stage.reward_components["_redness"],
                               stage.rewards, rtol=1e-5)
    for name in ("_brightness", "_redness"):
        assert abs(stage.stats[f"reward/{name}"] - stage.reward_components[name].mean()) < 1e-6
    # the plain sum follows the large part; the per-reward advantages weigh both parts as the weights say
    n = trainer.config.num_branches
    plain = build_rule(make_trainer(tiny_model_dir, reward=reward, selection_rule="grpo").config)(
        StageRewards(stage.rewards.reshape(-1, n), stage.all_prompts))
    assert not np.allclose(plain.scores.reshape(-1), stage.scores)
