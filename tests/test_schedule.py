import math

import pytest
from transformers import HfArgumentParser

from b2trl import IntervalSchedule


def test_reference_schedule_matches_formula_for_all_stages():
    schedule = IntervalSchedule(initial_length=14, num_stages=100)
    lengths = schedule.lengths(20)
    assert lengths == [14 + math.floor(7 * k / 100) for k in range(100)]
    assert lengths[0] == 14 and lengths[85] == 19 and lengths[86] == 20 and lengths[-1] == 20
    for k in range(100):
        assert schedule.branch_point(k, 20) == 20 - lengths[k]


def test_defaults_are_the_reference_schedule():
    assert IntervalSchedule() == IntervalSchedule(initial_length=14, num_stages=100)


def test_lengths_never_shrink_and_hold_full_trajectory_after_the_end():
    schedule = IntervalSchedule(initial_length=3, num_stages=10)
    lengths = schedule.lengths(12, num_stages=30)
    assert all(b >= a for a, b in zip(lengths, lengths[1:]))
    assert lengths[0] == 3 and lengths[10:] == [12] * 20


def test_from_last_step_starts_with_only_the_final_step():
    schedule = IntervalSchedule.from_last_step(num_stages=20)
    lengths = schedule.lengths(20)
    assert lengths[0] == 1 and schedule.branch_point(0, 20) == 19
    assert lengths == [1 + (20 * k) // 20 for k in range(20)]


def test_milestones_grow_one_step_at_each_listed_stage():
    schedule = IntervalSchedule(initial_length=2, milestones=[3, 5, 9])
    lengths = [schedule.length(k, 4) for k in range(12)]
    assert lengths == [2, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4]  # capped at T = 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(initial_length=0), "initial_length"),
        (dict(num_stages=0), "num_stages"),
        (dict(milestones=[3, 3]), "milestones"),
        (dict(milestones=[5, 2]), "milestones"),
        (dict(milestones=[-1, 2]), "milestones"),
    ],
)
def test_invalid_schedules_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"IntervalSchedule.{field}"):
        IntervalSchedule(**kwargs)


def test_interval_longer_than_trajectory_is_rejected():
    with pytest.raises(ValueError, match="initial_length .*longer than the trajectory"):
        IntervalSchedule(initial_length=21).length(0, 20)


def test_parses_from_the_command_line():
    (schedule,) = HfArgumentParser(IntervalSchedule).parse_args_into_dataclasses(
        ["--initial_length", "4", "--milestones", "1", "2"]
    )
    assert schedule == IntervalSchedule(initial_length=4, milestones=[1, 2])


def test_interval_is_the_last_steps_by_default_and_the_first_steps_when_anchored_at_the_start():
    end, start = IntervalSchedule(initial_length=3, num_stages=4), IntervalSchedule(initial_length=3, num_stages=4,
                                                                                     anchor="start")
    for stage in range(6):
        length = end.length(stage, 8)
        assert start.length(stage, 8) == length
        assert end.interval(stage, 8) == (8 - length, 8) and end.branch_point(stage, 8) == 8 - length
        assert start.interval(stage, 8) == (0, length) and start.branch_point(stage, 8) == 0
    assert start.interval(0, 8) == (0, 3) and start.interval(5, 8) == (0, 8)  # grows forwards to the whole run
    assert start.to_dict()["anchor"] == "start" and IntervalSchedule().anchor == "end"


def test_an_unknown_anchor_is_named():
    with pytest.raises(ValueError, match="IntervalSchedule.anchor .*'end', 'start'.*'middle'"):
        IntervalSchedule(anchor="middle")


def test_anchor_parses_from_the_command_line_and_rejects_other_values():
    parser = HfArgumentParser(IntervalSchedule)
    (schedule,) = parser.parse_args_into_dataclasses(["--anchor", "start"])
    assert schedule.anchor == "start"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--anchor", "middle"])


def test_sliding_window_moves_one_step_every_shift_every_stages_and_wraps_after_the_last_start():
    schedule = IntervalSchedule(initial_length=4, anchor="sliding", shift_every=3)
    # T = 10: starts 0 .. 6 (the default last start, T - length), each held 3 stages, then back to 0
    firsts = [schedule.interval(k, 10)[0] for k in range(24)]
    assert firsts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 0, 0, 0]
    assert all(schedule.interval(k, 10)[1] - schedule.interval(k, 10)[0] == 4 for k in range(24))
    assert schedule.branch_point(4, 10) == 1 and schedule.length(50, 10) == 4  # the length never grows
    capped = IntervalSchedule(initial_length=4, anchor="sliding", window_max_start=2)
    assert [capped.interval(k, 25) for k in range(5)] == [(0, 4), (1, 5), (2, 6), (0, 4), (1, 5)]


def test_random_window_draws_its_start_from_the_allowed_range_the_same_way_every_time():
    schedule = IntervalSchedule(initial_length=2, anchor="random", window_max_start=8, window_seed=3)
    intervals = [schedule.interval(k, 20) for k in range(400)]
    firsts = [first for first, _ in intervals]
    assert all(end - first == 2 for first, end in intervals)
    assert set(firsts) == set(range(9))  # every start in 0 .. 8, none beyond
    # counts of each start are near uniform (400 / 9 ≈ 44 each)
    assert max(firsts.count(s) for s in range(9)) < 70 and min(firsts.count(s) for s in range(9)) > 20
    # a fresh schedule (a resumed run) draws the same window at every stage, whatever it asked before
    again = IntervalSchedule(initial_length=2, anchor="random", window_max_start=8, window_seed=3)
    assert [again.interval(k, 20) for k in reversed(range(400))] == intervals[::-1]
    other_seed = IntervalSchedule(initial_length=2, anchor="random", window_max_start=8, window_seed=4)
    assert [other_seed.interval(k, 20)[0] for k in range(50)] != firsts[:50]
    # the default range lets the window reach the last step
    full = IntervalSchedule(initial_length=3, anchor="random")
    assert {full.interval(k, 6)[0] for k in range(200)} == {0, 1, 2, 3}


def test_window_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="IntervalSchedule.shift_every"):
        IntervalSchedule(anchor="sliding", shift_every=0)
    with pytest.raises(ValueError, match="IntervalSchedule.window_max_start"):
        IntervalSchedule(anchor="random", window_max_start=-1)
    with pytest.raises(ValueError, match="window_max_start .*past the last"):
        IntervalSchedule(initial_length=4, anchor="sliding", window_max_start=7).interval(0, 10)
    with pytest.raises(ValueError, match="IntervalSchedule.anchor"):
        IntervalSchedule(anchor="middle")
