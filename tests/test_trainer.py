import pytest
import torch
from trl import DDPOTrainer

from b2trl import B2DiffuRLTrainer
from helpers import brightness_reward, constant_reward, lora_params, make_trainer, max_change


def test_is_a_ddpo_trainer_with_its_constructor(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    assert isinstance(trainer, DDPOTrainer) and isinstance(trainer, B2DiffuRLTrainer)


def test_gradient_unet_calls_see_only_the_current_interval(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    with_grad, without_grad = set(), set()

    def record(module, args):
        (with_grad if torch.is_grad_enabled() else without_grad).update(args[1].reshape(-1).tolist())

    handle = trainer.sd_pipeline.unet.register_forward_pre_hook(record)
    try:
        trainer.step(0, 0)  # stage 0: L = 2 of T = 6
        interval = set(trainer.sd_pipeline.scheduler.timesteps[4:].tolist())
        assert with_grad == interval
        assert without_grad == set(trainer.sd_pipeline.scheduler.timesteps.tolist())  # sampling ran all steps
        with_grad.clear()
        trainer.step(3, 0)  # stage 3 of 4: L = 2 + floor(5 * 3 / 4) = 5
        assert with_grad == set(trainer.sd_pipeline.scheduler.timesteps[1:].tolist())
    finally:
        handle.remove()


def test_stage_stats_and_optimizer_steps_follow_the_kept_samples(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, train_num_inner_epochs=2)
    before = lora_params(trainer.sd_pipeline)
    global_step = trainer.step(0, 0)
    stats = trainer.last_stage_stats
    assert stats["interval_length"] == 2 and stats["branch_point"] == 4
    assert stats["groups_total"] == 4 and stats["samples_total"] == 12
    assert 0 < stats["samples_kept"] <= 2 * stats["groups_kept"] <= 8
    # with thresholds +-0.5 every kept sample has a clearly signed advantage
    assert stats["samples_kept_positive"] + stats["samples_kept_negative"] == stats["samples_kept"]
    # micro-batches of 2, an optimizer step every 2 micro-batches, per inner epoch
    per_epoch = -(-(-(-stats["samples_kept"] // 2)) // 2)
    assert global_step == stats["optimizer_steps"] == 2 * per_epoch
    assert max_change(before, lora_params(trainer.sd_pipeline)) > 0


def test_a_stage_where_no_group_passes_skips_the_update(tiny_model_dir, caplog):
    trainer = make_trainer(tiny_model_dir, reward=constant_reward)
    before = lora_params(trainer.sd_pipeline)
    with caplog.at_level("WARNING"):
        global_step = trainer.step(0, 5)
    assert global_step == 5
    assert trainer.last_stage_stats["skipped_update"] == 1 and trainer.last_stage_stats["samples_kept"] == 0
    assert max_change(before, lora_params(trainer.sd_pipeline)) == 0
    assert "no group passed the selection thresholds" in caplog.text


def test_full_fine_tuning_updates_the_unet(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, use_lora=False)
    name, param = next((n, p) for n, p in trainer.sd_pipeline.unet.named_parameters() if "to_q" in n)
    before = param.detach().clone()
    trainer.step(0, 0)
    assert param.requires_grad and not torch.equal(before, param.detach())
    assert not any("lora" in n for n, _ in trainer.sd_pipeline.unet.named_parameters())


def test_bad_reward_outputs_name_the_reward_and_the_stage(tiny_model_dir):
    def nan_reward(images, prompts, metadata):
        return torch.full((images.shape[0],), float("nan")), {}

    def short_reward(images, prompts, metadata):
        return torch.zeros(1), {}

    with pytest.raises(ValueError, match="nan_reward.*non-finite.*stage 0"):
        make_trainer(tiny_model_dir, reward=nan_reward).step(0, 0)
    with pytest.raises(ValueError, match=r"short_reward.*shape \(1,\) at stage 0"):
        make_trainer(tiny_model_dir, reward=short_reward).step(0, 0)


def _sampled_rewards(trainer, seed=123):
    torch.manual_seed(seed)
    _, data = trainer._generate_samples(iterations=4, batch_size=4, branch_point=0)
    return torch.cat([brightness_reward(images, None, None)[0] for images, *_ in data])


def test_training_raises_a_simple_reward(tiny_model_dir):
    trainer = make_trainer(
        tiny_model_dir,
        num_epochs=8,
        seed=1,
        train_learning_rate=5e-3,
        sample_batch_size=4,
        sample_num_batches_per_epoch=1,
        num_branches=4,
        train_gradient_accumulation_steps=1,
        history_stages=2,
        interval_schedule={"initial_length": 6, "num_stages": 10},
    )
    base = _sampled_rewards(trainer)
    trainer.train()
    trained = _sampled_rewards(trainer)
    # Same seeds and prompts before and after, so each image is compared with its own counterpart: nearly
    # every one got brighter, and the mean gain is well outside the spread of the per-image gains.
    gain = trained - base
    assert (gain > 0).float().mean() >= 0.9, gain
    assert gain.mean() > 2 * gain.std(), gain


def test_existing_checkpoints_are_refused_before_any_work(tiny_model_dir, tmp_path):
    (tmp_path / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint_0" / "b2trl_state.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        make_trainer(tiny_model_dir, save_freq=1, project_kwargs={"project_dir": str(tmp_path)})


def test_nonfinite_rewards_can_be_dropped_and_are_counted(tiny_model_dir):
    def half_nan(images, prompts, metadata):
        rewards, _ = brightness_reward(images, prompts, metadata)
        rewards[::2] = float("nan")
        return rewards, {}

    trainer = make_trainer(tiny_model_dir, reward=half_nan, drop_nonfinite_rewards=True)
    trainer.step(0, 0)
    stats = trainer.last_stage_stats
    assert stats["rewards_dropped"] == 6 and stats["samples_total"] == 12
    assert stats["reward_mean"] == stats["reward_mean"]  # not NaN
    assert 0 < stats["samples_kept"] <= 6


def test_failing_prompt_and_reward_functions_are_named(tiny_model_dir):
    from b2trl import B2DiffuRLTrainer, load_pipeline
    from helpers import small_config

    def broken_prompts():
        raise KeyError("prompt source gone")

    def bad_prompts():
        return "a cat"

    def broken_reward(images, prompts, metadata):
        raise RuntimeError("scorer crashed")

    for prompt_fn, error, pattern in [
        (broken_prompts, RuntimeError, "prompt_function broken_prompts raised: KeyError"),
        (bad_prompts, TypeError, r"prompt_function bad_prompts must return \(prompt: str, metadata\)"),
    ]:
        trainer = B2DiffuRLTrainer(small_config(), brightness_reward, prompt_fn, load_pipeline(tiny_model_dir))
        with pytest.raises(error, match=pattern):
            trainer.step(0, 0)
    with pytest.raises(RuntimeError, match="reward_function .*broken_reward raised at stage 0.*scorer crashed"):
        make_trainer(tiny_model_dir, reward=broken_reward).step(0, 0)


def _one_stage_with_grad_calls(model_dir, **overrides):
    trainer = make_trainer(model_dir, interval_schedule={"initial_length": 3, "num_stages": 4}, **overrides)
    calls = []

    def record(module, args):
        if torch.is_grad_enabled():
            calls.append(args[0].shape[0])

    handle = trainer.sd_pipeline.unet.register_forward_pre_hook(record)
    try:
        torch.manual_seed(0)
        trainer.step(0, 0)
    finally:
        handle.remove()
    return lora_params(trainer.sd_pipeline), calls


def test_stacking_interval_steps_gives_the_same_update_in_fewer_calls(tiny_model_dir):
    one, calls_one = _one_stage_with_grad_calls(tiny_model_dir, train_timesteps_per_forward=1)
    three, calls_three = _one_stage_with_grad_calls(tiny_model_dir, train_timesteps_per_forward=3)
    assert max(float(v.abs().max()) for n, v in one.items() if "lora_B" in n) > 0  # the stage did train
    assert max_change(one, three) < 1e-6
    assert len(calls_one) == 3 * len(calls_three) > 0  # interval of 3 steps: one call instead of three
    assert sum(calls_one) == sum(calls_three)  # the same rows in total


def test_a_start_anchored_schedule_trains_only_the_first_steps(tiny_model_dir):
    from b2trl import IntervalSchedule

    schedule = IntervalSchedule(initial_length=2, num_stages=4, anchor="start")
    trainer = make_trainer(tiny_model_dir, interval_schedule=schedule, selection_rule="all")
    before = lora_params(trainer.sd_pipeline)
    with_grad, without_grad = set(), set()

    def record(module, args):
        (with_grad if torch.is_grad_enabled() else without_grad).update(args[1].reshape(-1).tolist())

    handle = trainer.sd_pipeline.unet.register_forward_pre_hook(record)
    try:
        trainer.step(0, 0)  # stage 0: the first 2 of 6 steps
        timesteps = trainer.sd_pipeline.scheduler.timesteps
        assert with_grad == set(timesteps[:2].tolist())
        assert without_grad == set(timesteps.tolist())  # sampling still ran every step
        stats = trainer.last_stage_stats
        assert (stats["branch_point"], stats["interval_end"], stats["interval_length"]) == (0, 2, 2)
        with_grad.clear()
        trainer.step(3, 0)  # stage 3 of 4: L = 2 + floor(5 * 3 / 4) = 5, steps [0, 5)
        assert with_grad == set(timesteps[:5].tolist())
    finally:
        handle.remove()
    assert max_change(before, lora_params(trainer.sd_pipeline)) > 0


def test_updates_that_mostly_push_down_are_warned_about_once(tiny_model_dir, caplog):
    from b2trl.scoring import NegativeSkewWatch

    watch = NegativeSkewWatch(stages=3, ratio=2.0)
    stage = lambda k, p, n: {"stage": k, "samples_kept_positive": p, "samples_kept_negative": n}  # noqa: E731
    assert watch.update(stage(0, 0, 6)) is None and watch.update(stage(1, 0, 6)) is None  # fewer than 3 stages
    assert watch.update(stage(2, 9, 1)) is None  # stages 0-2 together: 13 negative vs 9 positive, under 2 to 1
    assert watch.update(stage(3, 1, 5)) is None  # stages 1-3: 12 vs 10
    assert watch.update(stage(4, 3, 3)) is None  # stages 2-4: 9 vs 13
    # stages 3-5: 14 negative vs 4 positive, though stage 4 was balanced
    message = watch.update(stage(5, 0, 6))
    assert "Stages 3-5" in message and "selection_rule='pairs'" in message
    assert "14 negative vs 4 positive" in message and "5 vs 1, 3 vs 3, 6 vs 0" in message
    assert watch.update(stage(6, 0, 9)) is None  # once per run
    empty = NegativeSkewWatch(stages=3, ratio=2.0)
    assert [empty.update(stage(k, 0, 0)) for k in range(4)] == [None] * 4  # nothing kept: nothing pushed down

    # a reward where one branch of six fails: its z-score is -2.2, the others' +0.45 stay below the threshold, so
    # best/worst keeps only failures, every stage
    def one_failure_per_group(images, prompts, metadata):
        return torch.tensor([0.0 if i % 6 == 0 else 1.0 for i in range(images.shape[0])]), {}

    trainer = make_trainer(tiny_model_dir, reward=one_failure_per_group, num_branches=6, sample_batch_size=2,
                           sample_num_batches_per_epoch=1, num_epochs=4, selection_rule="best_worst")
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.last_stage_stats["samples_kept_positive"] == 0
    assert sum("mostly negative" in r.getMessage() for r in caplog.records) == 1
    # the trainer's default rule keeps each failure with its group's best, advantages summing to zero: no warning
    caplog.clear()
    trainer = make_trainer(tiny_model_dir, reward=one_failure_per_group, num_branches=6, sample_batch_size=2,
                           sample_num_batches_per_epoch=1, num_epochs=4, selection_rule="pairs")
    with caplog.at_level("WARNING"):
        trainer.train()
    stats = trainer.last_stage_stats
    assert stats["samples_kept_positive"] == stats["samples_kept_negative"] > 0
    assert stats["kept_advantage_sum"] == pytest.approx(0.0, abs=1e-6)
    assert not any("mostly negative" in r.getMessage() for r in caplog.records)
