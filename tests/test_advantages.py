import numpy as np
import pytest

from b2trl.selection import (
    PromptRewardHistory,
    advantages_from_z,
    pad_rows,
    pair_rows,
    select,
    select_best_worst,
    select_pairs,
    stage_advantages,
    training_rows,
)


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
    assert keep.sum() == 1 and adv[keep].sum() < 0
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
