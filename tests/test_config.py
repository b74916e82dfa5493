import pytest
from transformers import HfArgumentParser
from trl import DDPOConfig

from b2trl import B2DiffuRLConfig, IntervalSchedule


def test_defaults_reproduce_the_reference_run():
    config = B2DiffuRLConfig()
    assert isinstance(config, DDPOConfig)
    assert (config.sample_num_steps, config.sample_eta, config.sample_guidance_scale) == (20, 1.0, 5.0)
    assert (config.train_clip_range, config.train_learning_rate, config.train_num_inner_epochs) == (0.1, 1e-4, 2)
    assert (config.num_branches, config.selection_threshold_best, config.selection_threshold_worst) == (5, 0.5, -0.5)
    assert config.history_stages == 8 and config.num_epochs == 100
    assert (config.sample_batch_size, config.sample_num_batches_per_epoch, config.train_batch_size) == (8, 32, 2)
    assert config.interval_schedule.lengths(config.sample_num_steps)[:2] == [14, 14]


def test_every_problem_is_reported_with_its_field():
    with pytest.raises(ValueError) as err:
        B2DiffuRLConfig(
            num_branches=1,
            sample_eta=0.0,
            selection_threshold_best=-1.0,
            selection_threshold_worst=1.0,
            train_batch_size=0,
            interval_schedule=IntervalSchedule(initial_length=30),
        )
    message = str(err.value)
    for field in ("num_branches", "sample_eta", "selection_threshold_best", "train_batch_size", "initial_length"):
        assert field in message


def test_one_branch_needs_the_all_rule():
    assert B2DiffuRLConfig(num_branches=1, selection_rule="all").num_branches == 1
    for rule in ("best_worst", "pairs"):
        with pytest.raises(ValueError, match="num_branches=1 works only with selection_rule='all'"):
            B2DiffuRLConfig(num_branches=1, selection_rule=rule)


def test_schedule_may_be_given_as_a_dict():
    config = B2DiffuRLConfig(interval_schedule={"initial_length": 3, "num_stages": 7})
    assert config.interval_schedule == IntervalSchedule(initial_length=3, num_stages=7)


def test_hf_argument_parser_builds_the_cli():
    parser = HfArgumentParser((B2DiffuRLConfig, IntervalSchedule))
    config, schedule = parser.parse_args_into_dataclasses(
        ["--num_branches", "4", "--selection_threshold_best", "0.7", "--initial_length", "10"]
    )
    assert config.num_branches == 4 and config.selection_threshold_best == 0.7
    assert schedule.initial_length == 10
    help_text = parser.format_help()
    assert "--num_branches" in help_text and "--history_stages" in help_text and "--milestones" in help_text


def test_to_dict_is_flat_and_scalar():
    flat = B2DiffuRLConfig().to_dict()
    assert flat["interval_schedule/initial_length"] == 14
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
