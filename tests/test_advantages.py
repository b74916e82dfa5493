"""The advantage seam: the selection rules of B²-DiffuRL (same numbers as before they moved onto the seam), the
group-relative rule, the registry, and the rows a stage's kept samples become."""

from types import SimpleNamespace

import numpy as np
import pytest

from b2trl import B2DiffuRLConfig
from b2trl.advantages import RULES, AdvantageRule, StageRewards, build_rule, clip_advantages, register_rule
from b2trl.advantages.best_worst import select_best_worst
from b2trl.advantages.history import PromptRewardHistory
from b2trl.advantages.pairs import select_pairs
from b2trl.batching import pad_rows, pair_rows, training_rows


def _config(**overrides):
    values = dict(selection_threshold_best=0.5, selection_threshold_worst=-0.5, train_adv_clip_max=5.0,
                  history_stages=8, advantage_std="group", advantage_per_reward=False)
    values.update(overrides)
    return SimpleNamespace(**values)


class _FixedZ:
    """A history that hands out given z-scores: the rules' selection and advantages, tested on known z."""

    def __init__(self, z):
        self.z = np.asarray(z, dtype=np.float64)

    def update(self, prompts, rewards):
        return self.z.reshape(-1)


def _rule_on_z(name, z, **config):
    """The rule `name` applied to z-scores `z` ``(groups, branches)`` through the seam."""
    rule = build_rule(_config(**config), name)
    rule.history = _FixedZ(z)
    z = np.asarray(z, dtype=np.float64)
    return rule(StageRewards(np.zeros(z.shape), ["p"] * z.size))


def select(z, rule, threshold_best, threshold_worst):
    return _rule_on_z(rule, z, selection_threshold_best=threshold_best, selection_threshold_worst=threshold_worst).keep


def stage_advantages(z, keep, rule, clip):
    out = _rule_on_z(rule, z, train_adv_clip_max=clip)
    np.testing.assert_array_equal(out.keep, keep)
    return out.advantages


def advantages_from_z(z, clip):
    return clip_advantages(z, clip)


def test_best_worst_keeps_exactly_the_rows_the_rule_says():
    z = np.array(
        [
            [0.6, 0.0, -0.7, 0.1],  # best passes (0.6 >= 0.5), worst passes (-0.7 < -0.5)
            [0.4, 0.0, -0.2, 0.1],  # neither passes: the group is dropped
            [0.5, -0.5, 0.0, 0.2],  # best exactly at +0.5 kept; worst exactly at -0.5 is not < -0.5
            [-0.9, 2.0, -1.0, 0.3],  # best 2.0 kept, worst -1.0 kept; -0.9 is not the worst
        ]
    )
    keep = select_best_worst(z, 0.5, -0.5)
    expected = np.zeros_like(keep)
    expected[0, [0, 2]] = True
    expected[2, 0] = True
    expected[3, [1, 2]] = True
    np.testing.assert_array_equal(keep, expected)


def test_all_rule_keeps_everything_and_unknown_rule_fails():
    assert select(np.zeros((2, 3)), "all", 0.5, -0.5).all()
    with pytest.raises(ValueError, match="selection_rule"):
        select(np.zeros((2, 3)), "best", 0.5, -0.5)
    assert select_best_worst(np.array([[0.6, -0.6]]), 0.5, -0.5).all()


def test_z_scores_are_per_prompt():
    history = PromptRewardHistory(history_stages=8)
    prompts = ["a", "a", "b", "b"]
    z = history.update(prompts, [1.0, 3.0, 10.0, 10.0])
    np.testing.assert_allclose(z, [-1.0, 1.0, 0.0, 0.0])  # b did not vary: no signal


def test_history_pools_previous_stages_and_forgets_old_ones():
    history = PromptRewardHistory(history_stages=1)
    history.update(["p", "p"], [0.0, 2.0])
    z = history.update(["p", "p"], [4.0, 6.0])
    pooled = np.array([0.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(z, (np.array([4.0, 6.0]) - pooled.mean()) / pooled.std())
    z = history.update(["p", "p"], [4.0, 6.0])  # the first stage has left the window
    pooled = np.array([4.0, 6.0, 4.0, 6.0])
    np.testing.assert_allclose(z, (np.array([4.0, 6.0]) - pooled.mean()) / pooled.std())


def test_history_state_round_trips():
    history = PromptRewardHistory(history_stages=2)
    history.update(["p", "q", "p"], [1.0, 2.0, 3.0])
    restored = PromptRewardHistory(history_stages=2)
    restored.load_state_dict(history.state_dict())
    assert restored.stats() == history.stats()
    np.testing.assert_allclose(restored.update(["p"], [5.0]), history.update(["p"], [5.0]))


def test_advantages_are_clipped_z():
    np.testing.assert_allclose(advantages_from_z([-7.0, 0.3, 9.0], clip=5.0), [-5.0, 0.3, 5.0])


def test_pad_rows_keeps_kept_rows_first_and_marks_padding():
    keep = np.array([False, True, False, True, False])
    rows, padding = pad_rows(keep, 4)
    assert rows[:2].tolist() == [1, 3] and padding.tolist() == [False, False, True, True]
    assert set(rows[2:]) <= {0, 2, 4}
    rows, padding = pad_rows(np.zeros(3, dtype=bool), 2)  # nothing kept here, others kept 2
    assert len(rows) == 2 and padding.all()
    with pytest.raises(ValueError):
        pad_rows(keep, 1)


def test_nan_z_scores_are_never_kept_and_do_not_hide_the_real_best():
    z = np.array([[np.nan, -0.2, 0.9, -0.8], [np.nan, np.nan, np.nan, np.nan]])
    keep = select_best_worst(z, 0.5, -0.5)
    assert keep.tolist() == [[False, False, True, True], [False, False, False, False]]
    assert select(z, "all", 0.5, -0.5).sum() == 3
    np.testing.assert_allclose(advantages_from_z([np.nan, 1.0], clip=5.0), [0.0, 1.0])


def test_history_ignores_nan_rewards():
    history = PromptRewardHistory(history_stages=1)
    z = history.update(["p", "p", "p"], [1.0, np.nan, 3.0])
    assert np.isnan(z[1]) and np.allclose(z[[0, 2]], [-1.0, 1.0])
    assert history.stats()["p"][2] == 2


def test_pairs_keep_best_and_worst_together_with_zero_sum_advantages():
    z = np.array(
        [
            [0.3, 0.0, -2.5, 0.1],  # gap 2.8 >= 1: a pair, although best alone (0.3) would fail best_worst
            [0.4, 0.0, -0.2, 0.1],  # gap 0.6 < 1: dropped
            [0.5, np.nan, -0.5, 0.2],  # gap exactly 1.0: kept; the NaN sample never is
            [12.0, 1.0, -0.5, 0.3],  # gap 12.5: advantages clipped to +-5
            [np.nan, np.nan, np.nan, np.nan],  # nothing valid: nothing kept
        ]
    )
    keep = select(z, "pairs", 0.5, -0.5)
    expected = np.zeros_like(keep)
    expected[0, [0, 2]] = expected[2, [0, 2]] = expected[3, [0, 2]] = True
    np.testing.assert_array_equal(keep, expected)
    adv = stage_advantages(z, keep, "pairs", clip=5.0)
    np.testing.assert_allclose(adv[0], [1.4, 0.0, -1.4, 0.0])
    np.testing.assert_allclose(adv[2], [0.5, 0.0, -0.5, 0.0])
    np.testing.assert_allclose(adv[3], [5.0, 0.0, -5.0, 0.0])
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-12)
    assert not adv[~keep].any()


def test_best_worst_advantages_are_the_z_scores_and_can_be_one_sided():
    # skewed rewards: one bad branch has a large negative z, the good ones sit below +0.5; best_worst keeps only
    # the bad one, so the stage pushes down only (what "pairs" is there to avoid)
    z = np.array([[0.3, 0.3, 0.3, -2.5]])
    keep = select(z, "best_worst", 0.5, -0.5)
    adv = stage_advantages(z, keep, "best_worst", clip=5.0)
    assert keep.sum() == 1 and adv[keep].sum() < 0 and not adv[~keep].any()
    assert select(z, "pairs", 0.5, -0.5).sum() == 2


def test_training_rows_weigh_padding_zero():
    rows, weight = training_rows(np.array([False, True, True]), 4)
    assert rows[:2].tolist() == [1, 2] and weight.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_pair_rows_put_each_winner_before_its_loser_and_pad_with_zero_weight_pairs():
    z = np.array([[0.1, 2.0, -1.5], [0.0, 0.1, 0.05], [-2.0, 0.3, 1.2]])
    keep = select_pairs(z, 1.0)
    assert keep.any(1).tolist() == [True, False, True]
    rows, weight = pair_rows(z, keep, 3)
    assert rows[:4].tolist() == [1, 2, 8, 6]  # group 0: branch 1 beats 2; group 2: branch 2 beats 0
    assert weight.tolist() == [1, 1, 1, 1, 0, 0]
    assert len(rows) == 6 and rows.max() < z.size
    with pytest.raises(ValueError, match="smaller than the number of kept pairs"):
        pair_rows(z, keep, 1)


# ---------------------------------------------------------------------- the rules with their real history


def test_zscore_rules_score_against_the_prompt_history_and_checkpoint_it():
    rewards = np.array([[1.0, 2.0, 6.0], [5.0, 5.0, 5.0]])
    prompts = ["a"] * 3 + ["b"] * 3
    rule = build_rule(_config(), "best_worst")
    out = rule(StageRewards(rewards, prompts))
    z_a = (rewards[0] - rewards[0].mean()) / rewards[0].std()
    np.testing.assert_allclose(out.scores[0], z_a)
    np.testing.assert_array_equal(out.scores[1], 0.0)  # "b" did not vary
    np.testing.assert_array_equal(out.keep, select_best_worst(out.scores, 0.5, -0.5))
    np.testing.assert_allclose(out.advantages[0], np.where(out.keep[0], z_a, 0.0))
    # the next stage pools this one; a rule restored from the state dict computes the same z-scores
    restored = build_rule(_config(), "best_worst")
    restored.load_state_dict(rule.state_dict())
    following = StageRewards(np.array([[3.0, 3.5, 0.0]]), ["a"] * 3)
    np.testing.assert_array_equal(rule(following).scores, restored(following).scores)


# ---------------------------------------------------------------------- grpo


def _grpo(rewards, prompts, **config):
    return build_rule(_config(**config), "grpo")(StageRewards(np.asarray(rewards, dtype=np.float64), prompts))


def test_grpo_normalises_each_prompt_by_its_own_mean_and_the_group_or_global_std():
    rewards = [[1.0, 2.0, 6.0], [4.0, 4.0, 10.0]]
    prompts = ["a"] * 3 + ["b"] * 3
    # by hand: group "a" mean 3, population std sqrt(14/3); group "b" mean 6, std sqrt(8)
    std_a, std_b = (14 / 3) ** 0.5, 8**0.5
    expected = [[(1 - 3) / (std_a + 1e-4), (2 - 3) / (std_a + 1e-4), (6 - 3) / (std_a + 1e-4)],
                [(4 - 6) / (std_b + 1e-4), (4 - 6) / (std_b + 1e-4), (10 - 6) / (std_b + 1e-4)]]
    out = _grpo(rewards, prompts)
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-12)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-12)
    assert out.keep.all() and abs(out.advantages.sum()) < 1e-9
    # global: every reward's std (mean 4.5, population std sqrt(71/6)) divides both groups
    std = (sum((r - 4.5) ** 2 for r in [1, 2, 6, 4, 4, 10]) / 6) ** 0.5
    out = _grpo(rewards, prompts, advantage_std="global")
    np.testing.assert_allclose(out.advantages, [[-2 / (std + 1e-4), -1 / (std + 1e-4), 3 / (std + 1e-4)],
                                                [-2 / (std + 1e-4), -2 / (std + 1e-4), 4 / (std + 1e-4)]],
                               rtol=1e-12)


def test_grpo_clips_pools_repeated_prompts_and_trains_every_nonzero_advantage():
    # one outlier among 30 ties: its normalised reward is ~5.4, clipped to the limit; the ties are trained too
    rewards = np.array([[0.0] * 30 + [1.0]])
    out = _grpo(rewards, ["p"] * 31, train_adv_clip_max=2.0)
    assert out.scores[0, -1] > 5 and out.advantages[0, -1] == 2.0 and out.keep.all()
    # a group whose samples tie has advantage 0 everywhere: nothing of it is trained
    out = _grpo([[0.7, 0.7], [0.1, 0.9]], ["tie", "tie", "x", "x"])
    assert out.keep.tolist() == [[False, False], [True, True]] and not out.advantages[0].any()
    # two groups of the same prompt are one group (Flow-GRPO groups by prompt, not by rollout)
    pooled = _grpo([[0.0, 1.0], [2.0, 3.0]], ["p"] * 4)
    np.testing.assert_allclose(pooled.advantages.reshape(-1),
                               (np.array([0.0, 1.0, 2.0, 3.0]) - 1.5) / (np.std([0, 1, 2, 3]) + 1e-4))
    # a dropped (NaN) reward is left out of its group's statistics and never trained
    out = _grpo([[np.nan, 1.0, 3.0]], ["p"] * 3)
    assert not out.keep[0, 0] and out.advantages[0, 0] == 0
    np.testing.assert_allclose(out.advantages[0, 1:], [-1 / (1 + 1e-4), 1 / (1 + 1e-4)])


def test_grpo_per_reward_normalises_each_part_within_its_group_before_the_weighted_sum():
    prompts = ["a"] * 3 + ["b"] * 3
    # part "big" has a range 1000 times "small"'s; weights 1 and 1
    big = np.array([[0.0, 1000.0, 2000.0], [0.0, 0.0, 3000.0]])
    small = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    stage = StageRewards(big + small, prompts, components={"big": big, "small": small},
                         weights={"big": 1.0, "small": 1.0})
    out = build_rule(_config(advantage_per_reward=True), "grpo")(stage)

    def normed(values):
        return (values - values.mean(1, keepdims=True)) / (values.std(1, keepdims=True) + 1e-4)

    total = (normed(big) + normed(small)).reshape(-1)
    expected = (total - total.mean()) / (total.std() + 1e-4)
    np.testing.assert_allclose(out.scores.reshape(-1), expected, rtol=1e-10)
    # in group "a" the parts disagree exactly: after per-part normalisation they cancel, where the plain sum
    # follows the big part alone
    np.testing.assert_allclose(out.scores[0], 0.0, atol=1e-3)
    assert np.argmax(_grpo(big + small, prompts).scores[0]) == 2
    with pytest.raises(ValueError, match="advantage_per_reward=True needs a reward made of parts"):
        build_rule(_config(advantage_per_reward=True), "grpo")(StageRewards(big, prompts))


def test_the_config_accepts_registered_rules_and_checks_grpo_options_by_name():
    assert {"best_worst", "pairs", "all", "grpo"} <= set(RULES)
    assert B2DiffuRLConfig(selection_rule="grpo", advantage_std="global").advantage_std == "global"
    with pytest.raises(ValueError, match="advantage_std must be one of"):
        B2DiffuRLConfig(selection_rule="grpo", advantage_std="batch")
    with pytest.raises(ValueError, match="advantage_per_reward=True is an option of selection_rule='grpo'"):
        B2DiffuRLConfig(advantage_per_reward=True)
    # a loss declares the rule it needs: DPO takes the default as pairs, and refuses a rule without pairs
    assert B2DiffuRLConfig(loss_type="dpo").effective_selection_rule == "pairs"
    with pytest.raises(ValueError, match="loss_type='dpo' needs selection_rule='pairs'"):
        B2DiffuRLConfig(loss_type="dpo", selection_rule="grpo")


def test_a_new_rule_is_one_class_and_its_registration():
    @register_rule
    class TopOne(AdvantageRule):
        name = "test_top_one"

        def __call__(self, stage):
            best = stage.rewards == np.nanmax(stage.rewards, axis=1, keepdims=True)
            return type(build_rule(_config(), "all")(stage))(stage.rewards, best, best.astype(float))

    try:
        config = B2DiffuRLConfig(selection_rule="test_top_one")
        out = build_rule(config)(StageRewards(np.array([[0.1, 0.9]]), ["p", "p"]))
        assert out.keep.tolist() == [[False, True]]
    finally:
        RULES.pop("test_top_one")
