"""The named method presets: each row builds a valid configuration and trains one stage on the tiny pipeline of
every family it supports, with the rollout's denoiser calls in the method's shape and gradients only at the
method's trained steps."""

import pytest
import torch

from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer, IntervalSchedule, list_methods, load_pipeline
from b2trl.methods import METHODS, resolve
from helpers import brightness_reward, cycling_prompts

STEPS, PROMPTS_PER_BATCH = 6, 2
# the families a method supports, by the tiny pipeline fixture that builds each (and the resolution to train at:
# FLUX's and Qwen-Image's own defaults are too large for a CPU)
FLOW_FAMILY = {"tiny_sd3_dir": None, "tiny_flux_dir": 16, "tiny_qwenimage_dir": 16, "tiny_zimage_dir": None}
ANY_FAMILY = {"tiny_model_dir": None, "tiny_sdxl_dir": None, **FLOW_FAMILY}
CASES = [(name, fixture) for name, method in METHODS.items()
         for fixture in (FLOW_FAMILY if method.samplers else ANY_FAMILY)]


def _config(name, **overrides):
    """The method at test size: 6 steps, 2 prompts, 3 branches (the methods' own group size when they set one);
    B²'s interval of 14 of 20 steps becomes 4 of 6."""
    values = dict(sample_num_steps=STEPS, sample_batch_size=PROMPTS_PER_BATCH, sample_num_batches_per_epoch=1,
                  train_batch_size=2, train_gradient_accumulation_steps=2, mixed_precision="no", save_freq=0,
                  num_epochs=1, seed=0)
    method = METHODS[name]
    if "num_branches" not in method.settings:
        values["num_branches"] = 3
    if method.schedule.get("initial_length", 14) == 14:
        values["interval_schedule"] = {"initial_length": 4, "num_stages": 4}
    values.update(overrides)
    return B2DiffuRLConfig.for_method(name, **values)


def _calls(trainer, calls):
    """Record every denoiser call: (phase, rows, first row's timestep, whether gradients were on), the phase being
    the trainer's step the call ran in."""
    phase = ["setup"]

    def in_phase(name, method):
        def run(*args, **kwargs):
            phase[0] = name
            return method(*args, **kwargs)

        return run

    trainer.sample_stage = in_phase("sampling", trainer.sample_stage)
    trainer.train_stage = in_phase("training", trainer.train_stage)

    def hook(module, args, kwargs):
        # UNets take (sample, timestep), the MMDiTs hidden_states= and timestep=, Z-Image a list x= and t=
        latents = args[0] if args else next(kwargs[k] for k in ("sample", "hidden_states", "x") if k in kwargs)
        timestep = args[1] if len(args) > 1 else next(kwargs[k] for k in ("timestep", "t") if k in kwargs)
        rows = len(latents) if isinstance(latents, list) else latents.shape[0]
        calls.append((phase[0], rows, float(timestep.reshape(-1)[0]), torch.is_grad_enabled()))

    return trainer.denoiser.register_forward_pre_hook(hook, with_kwargs=True)


def test_every_method_is_listed_with_a_description_and_a_source():
    methods = list_methods()
    assert list(methods) == ["b2", "b2_pairs", "b2_grpo", "ddpo", "d3po", "flow_grpo", "flow_grpo_fast", "mix_grpo"]
    for name, line in methods.items():
        method = METHODS[name]
        assert method.description and method.source and line == f"{method.description} ({method.source})"
    # the paper's run is the defaults with its own rule; the trainer's default rule is the zero-sum one
    assert B2DiffuRLConfig.for_method("b2") == B2DiffuRLConfig(method="b2", selection_rule="best_worst")
    assert B2DiffuRLConfig.for_method("b2_pairs") == B2DiffuRLConfig(method="b2_pairs")
    assert B2DiffuRLConfig().selection_rule == "pairs"


def test_for_method_applies_overrides_and_resolves_steps_from_the_final_step_count():
    ddpo = B2DiffuRLConfig.for_method("ddpo", sample_num_steps=12)
    assert ddpo.interval_schedule.interval(0, 12) == (0, 12) and ddpo.num_branches == 1 and ddpo.method == "ddpo"
    fast = B2DiffuRLConfig.for_method("flow_grpo_fast", sample_num_steps=10, train_clip_range=1e-4)
    assert fast.interval_schedule.window_max_start == 3 and fast.train_clip_range == 1e-4  # T // 2 - 2
    assert fast.selection_rule == "grpo" and fast.advantage_std == "global"
    # a dict merges onto the method's schedule; an IntervalSchedule replaces it
    moved = B2DiffuRLConfig.for_method("mix_grpo", interval_schedule={"shift_every": 2})
    assert moved.interval_schedule.anchor == "sliding" and moved.interval_schedule.shift_every == 2
    assert moved.interval_schedule.initial_length == 4
    replaced = B2DiffuRLConfig.for_method("mix_grpo", interval_schedule=IntervalSchedule(initial_length=3))
    assert replaced.interval_schedule.anchor == "end"
    assert resolve("T // 2 - 2", 20) == 8 and resolve(5, 20) == 5
    with pytest.raises(ValueError, match="not an expression in T"):
        resolve("__import__('os')", 20)
    with pytest.raises(ValueError, match="unknown method 'grpo'"):
        B2DiffuRLConfig.for_method("grpo")
    with pytest.raises(ValueError, match="method must be one of"):
        B2DiffuRLConfig(method="nope")


def test_flow_methods_are_refused_on_a_ddim_model_by_name(tiny_model_dir):
    config = _config("mix_grpo")
    with pytest.raises(ValueError, match="method='mix_grpo' is defined for flow-matching models"):
        B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), load_pipeline(tiny_model_dir))


@pytest.mark.parametrize("name, fixture", CASES)
def test_each_method_trains_a_stage_in_its_shape(name, fixture, request):
    config = _config(name, resolution=ANY_FAMILY[fixture])
    pipeline = load_pipeline(request.getfixturevalue(fixture))
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), pipeline)
    calls = []
    handle = _calls(trainer, calls)
    try:
        trainer.train()
    finally:
        handle.remove()

    first, end = config.interval_schedule.interval(0, STEPS)
    n, b = config.num_branches, PROMPTS_PER_BATCH
    cfg = 2 if trainer.negative_conditioning is not None else 1
    # sampling: rows per step, summed over the calls at one timestep (a family may run guidance's halves as two)
    sampling = [call for call in calls if call[0] == "sampling"]
    schedule = list(dict.fromkeys(t for _, _, t, _ in sampling))
    rows = [sum(r for _, r, t, _ in sampling if t == step) for step in schedule]
    prefix_rows = b * n if config.independent_noise else b
    assert len(schedule) == STEPS and not any(grad for *_, grad in sampling)
    assert rows == [prefix_rows * cfg] * first + [b * n * cfg] * (STEPS - first)
    trained = {t for phase, _, t, grad in calls if phase == "training" and grad}
    assert trained and trained <= set(schedule[first:end])  # gradients only at the method's interval
    stats = trainer.last_stage_stats
    assert (stats["branch_point"], stats["interval_end"]) == (first, end)
    assert stats["optimizer_steps"] > 0 and stats["samples_total"] == b * n
    assert stats["compute/sampling_rows"] == sum(rows)
    assert (trainer.ema is not None) == (config.ema_decay > 0)
