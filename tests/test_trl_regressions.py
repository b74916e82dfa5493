"""Each TRL 0.23.1 DDPO bug that this trainer's path touches: the plain `DDPOTrainer` shows it, ours does not.

Bug numbers follow the project's notes on TRL's DDPO trainer.
"""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

from b2trl import B2DiffuRLTrainer, load_pipeline
from helpers import brightness_reward, cycling_prompts, make_trainer, small_config


def _reset_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _plain_ddpo(model_dir, reward=brightness_reward, hook=None, **overrides):
    values = dict(
        num_epochs=1,
        sample_num_steps=4,
        sample_batch_size=2,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        mixed_precision="no",
        save_freq=1,
    )
    values.update(overrides)
    pipeline = load_pipeline(model_dir, use_lora=True)
    return DDPOTrainer(DDPOConfig(**values), reward, cycling_prompts(), pipeline, hook)


def bf16_reward(images, prompts, metadata):
    return images.to(torch.bfloat16).mean(dim=(1, 2, 3)), {}


def test_bug2_trainer_without_hook_needs_no_prior_accelerate_state(tiny_model_dir):
    pipeline = load_pipeline(tiny_model_dir)
    _reset_accelerate_state()
    with pytest.raises(RuntimeError, match="initialize the accelerate state"):
        DDPOTrainer(DDPOConfig(mixed_precision="no"), brightness_reward, cycling_prompts(), pipeline)
    _reset_accelerate_state()
    trainer = B2DiffuRLTrainer(small_config(), brightness_reward, cycling_prompts(), load_pipeline(tiny_model_dir))
    assert trainer.accelerator is not None


def test_bug2_lora_pipeline_without_stored_lora_needs_no_prior_accelerate_state(tiny_model_dir):
    _reset_accelerate_state()
    with pytest.raises(RuntimeError, match="initialize the accelerate state"):
        DefaultDDPOStableDiffusionPipeline(tiny_model_dir, use_lora=True)
    _reset_accelerate_state()
    assert load_pipeline(tiny_model_dir, use_lora=True).use_lora


def test_bug3_async_rewards_work_and_match_sync(tiny_model_dir):
    plain = _plain_ddpo(tiny_model_dir, async_reward_computation=True)
    pairs = [[torch.rand(2, 3, 16, 16), ("a", "b"), ({}, {})]]
    with pytest.raises(AttributeError, match="result"):
        list(plain.compute_rewards(pairs, is_async=True))

    trainer = make_trainer(tiny_model_dir, async_reward_computation=True)
    async_rewards, _ = trainer.compute_rewards(pairs, is_async=True)
    sync_rewards, _ = trainer.compute_rewards(pairs, is_async=False)
    torch.testing.assert_close(async_rewards[0], sync_rewards[0])
    trainer.step(0, 0)
    assert trainer.last_stage_stats["samples_total"] == 12


def test_bug4_image_hook_without_a_tracker(tiny_model_dir):
    calls = []

    def hook(prompt_image_data, global_step, tracker):
        calls.append((len(prompt_image_data), tracker))

    with pytest.raises(IndexError):
        _plain_ddpo(tiny_model_dir, hook=hook, log_with=None).step(0, 0)
    calls.clear()
    make_trainer(tiny_model_dir, hook=hook, log_with=None).step(0, 0)
    assert calls == [(2, None)]


def test_bug7_bf16_rewards(tiny_model_dir):
    with pytest.raises(TypeError, match="BFloat16"):
        _plain_ddpo(tiny_model_dir, reward=bf16_reward).step(0, 0)
    trainer = make_trainer(tiny_model_dir, reward=bf16_reward)
    trainer.step(0, 0)
    assert isinstance(trainer.last_stage_stats["reward_mean"], float)


def test_bug8_save_state_runs_on_every_process(tiny_model_dir, monkeypatch):
    def saves_on_a_non_main_process(trainer):
        calls = []
        monkeypatch.setattr(trainer.accelerator, "save_state", lambda *a, **k: calls.append(1))
        monkeypatch.setattr(type(trainer.accelerator), "is_main_process", property(lambda self: False))
        trainer.step(1, 0)
        monkeypatch.undo()
        return len(calls)

    assert saves_on_a_non_main_process(_plain_ddpo(tiny_model_dir, save_freq=1)) == 0
    assert saves_on_a_non_main_process(make_trainer(tiny_model_dir, save_freq=1)) == 1


def test_checkpoints_hold_the_lora_weights(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, save_freq=1, project_kwargs={"project_dir": str(tmp_path)})
    trainer.train(epochs=2)
    checkpoint = tmp_path / "checkpoints" / "checkpoint_1"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    assert (checkpoint / "optimizer.bin").is_file() and (checkpoint / "b2trl_state.json").is_file()
