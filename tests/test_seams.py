"""The three seams (model family, sampler, loss) and the batching module, each on its own."""

import numpy as np
import pytest
import torch

from b2trl import batching
from b2trl.losses import PPOClipLoss, build_loss
from b2trl.models import Conditioning, StableDiffusionFamily, family_for_class, family_for_pipeline
from b2trl.rollout import SampleBatch
from b2trl.samplers import DDIMSampler
from helpers import make_trainer, small_config


def _conditioning(rows=4, guided=True):
    cond = {"encoder_hidden_states": torch.arange(rows * 6.0).reshape(rows, 3, 2), "pooled": torch.arange(rows * 1.0)}
    uncond = {k: -v for k, v in cond.items()} if guided else None
    return Conditioning(cond, uncond)


def test_conditioning_round_trips_through_sample_rows_and_indexes_every_tensor():
    c = _conditioning()
    rows = c.to_rows()
    assert set(rows) == {"cond.encoder_hidden_states", "cond.pooled", "uncond.encoder_hidden_states", "uncond.pooled"}
    back = Conditioning.from_rows({**rows, "latents": torch.zeros(4)})
    assert back.guided and set(back.cond) == set(c.cond)
    for key in c.cond:
        assert torch.equal(back.cond[key], c.cond[key]) and torch.equal(back.uncond[key], c.uncond[key])
    picked = c.index(torch.tensor([2, 0]))
    assert torch.equal(picked.cond["pooled"], torch.tensor([2.0, 0.0]))
    assert torch.equal(picked.uncond["pooled"], torch.tensor([-2.0, -0.0]))
    repeated = _conditioning(guided=False).repeat_interleave(3)
    assert len(repeated) == 12 and not repeated.guided
    assert torch.equal(repeated.cond["pooled"][:6], torch.tensor([0.0, 0, 0, 1, 1, 1]))


def test_guided_prediction_runs_both_halves_in_one_call_unconditional_first():
    family = StableDiffusionFamily()
    calls = []

    def forward(denoiser, latents, timesteps, cond):
        calls.append((latents.shape[0], cond["encoder_hidden_states"][:, 0, 0].tolist()))
        return latents * cond["encoder_hidden_states"][:, :1, :1].reshape(-1, 1)

    family.forward = forward
    latents = torch.ones(2, 1)
    c = Conditioning({"encoder_hidden_states": torch.full((2, 1, 1), 3.0)},
                     {"encoder_hidden_states": torch.full((2, 1, 1), 1.0)})
    pred = family.predict(None, latents, torch.zeros(2), c, guidance_scale=5.0)
    assert calls == [(4, [1.0, 1.0, 3.0, 3.0])]
    torch.testing.assert_close(pred, torch.full((2, 1), 1.0 + 5.0 * (3.0 - 1.0)))


def test_families_are_picked_by_pipeline_class_and_unknown_classes_are_named():
    assert family_for_class("StableDiffusionPipeline").name == "sd"
    with pytest.raises(ValueError, match="KandinskyPipeline.*StableDiffusionPipeline"):
        family_for_class("KandinskyPipeline", "my/model")


def test_load_pipeline_returns_a_trl_pipeline_with_its_family(tiny_model_dir):
    from trl import DefaultDDPOStableDiffusionPipeline

    from b2trl import load_pipeline

    pipeline = load_pipeline(tiny_model_dir)
    assert isinstance(pipeline, DefaultDDPOStableDiffusionPipeline)
    assert pipeline.family.name == "sd" and family_for_pipeline(pipeline) is pipeline.family
    assert pipeline.denoiser is pipeline.unet is pipeline.sd_pipeline.unet
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for p in pipeline.unet.parameters())  # LoRA: the base is frozen


def test_trl_own_pipeline_is_recognised_as_sd(tiny_model_dir):
    from trl import DefaultDDPOStableDiffusionPipeline

    from b2trl.accelerator import ensure_accelerate_state

    ensure_accelerate_state()
    assert family_for_pipeline(DefaultDDPOStableDiffusionPipeline(tiny_model_dir)).name == "sd"


def test_a_model_id_that_cannot_be_found_is_named(monkeypatch):
    from b2trl import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="nobody/no-such-model"):
        load_pipeline("nobody/no-such-model")


def test_ddim_sampler_validates_eta_and_scores_a_given_next_sample_like_trl(tiny_model_dir):
    from trl.models.modeling_sd_base import scheduler_step

    assert DDIMSampler(0.0).validation_errors() and "sample_eta" in DDIMSampler(0.0).validation_errors()[0]
    assert DDIMSampler(1.0).validation_errors() == []
    trainer = make_trainer(tiny_model_dir)
    scheduler = trainer.sd_pipeline.scheduler
    sampler = DDIMSampler(1.0)
    timesteps = sampler.timesteps(scheduler, 6, "cpu")
    t = sampler.timestep_batch(timesteps[2], 3, "cpu")
    assert t.dtype == torch.long and t.shape == (3,)
    sample, output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    drawn = sampler.step(scheduler, output, t, sample, generator=torch.Generator().manual_seed(0))
    reference = scheduler_step(scheduler, output, t, sample, eta=1.0, prev_sample=drawn.prev_sample)
    scored = sampler.step(scheduler, output, t, sample, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(scored.log_prob, reference.log_probs, rtol=0, atol=0)
    torch.testing.assert_close(drawn.log_prob, reference.log_probs, rtol=0, atol=1e-6)


def test_ppo_loss_matches_trls_clip_objective_and_reports_its_statistics():
    from trl import DDPOTrainer

    torch.manual_seed(0)
    old, new, adv = torch.randn(64), torch.randn(64) * 0.1, torch.randn(64) * 3
    new = old + new
    loss = PPOClipLoss(clip_range=0.1, adv_clip_max=2.0)
    out = loss(new, {"log_probs": old, "advantages": adv})
    ratio = torch.exp(new - old)
    expected = DDPOTrainer.loss(None, torch.clamp(adv, -2.0, 2.0), 0.1, ratio)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    assert float(out.stats["clipfrac"]) == float(((ratio - 1).abs() > 0.1).float().mean())
    torch.testing.assert_close(out.stats["approx_kl"], 0.5 * ((new - old) ** 2).mean())
    assert isinstance(build_loss(small_config()), PPOClipLoss)


def test_shuffle_keeps_groups_together_at_the_same_interval_step():
    total, steps = 8, 5
    samples = {
        "timesteps": torch.arange(steps).repeat(total, 1) * 100 + torch.arange(total)[:, None],
        "log_probs": torch.arange(total * steps, dtype=torch.float32).reshape(total, steps),
        "advantages": torch.arange(total, dtype=torch.float32),
    }
    torch.manual_seed(0)
    shuffled = batching.shuffle(samples, group_size=2)
    rows = shuffled["advantages"].long()
    assert sorted(rows.tolist()) == list(range(total))
    for i in range(0, total, 2):
        assert rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1  # a pair stays adjacent, in order
        # both members see the same order of interval steps
        assert torch.equal(shuffled["timesteps"][i] // 100, shuffled["timesteps"][i + 1] // 100)
    for i in range(total):  # time keys moved with their row
        assert (shuffled["timesteps"][i] % 100 == rows[i]).all()
    with pytest.raises(ValueError, match="groups of 2"):
        batching.shuffle({k: v[:7] for k, v in samples.items()}, group_size=2)


def test_ungrouped_shuffle_draws_the_same_random_numbers_as_before():
    # the order of a stage's rows and steps depends only on the seed: randperm of rows, then rand for the steps
    samples = {"timesteps": torch.arange(12).reshape(4, 3), "advantages": torch.arange(4.0)}
    torch.manual_seed(3)
    shuffled = batching.shuffle(samples)
    torch.manual_seed(3)
    perm = torch.randperm(4)
    time_perm = torch.argsort(torch.rand(4, 3), dim=1)
    assert torch.equal(shuffled["advantages"], samples["advantages"][perm])
    assert torch.equal(shuffled["timesteps"], samples["timesteps"][perm][torch.arange(4)[:, None], time_perm])


def test_windows_never_split_a_group_and_stacked_steps_are_sample_major():
    windows = batching.accumulation_windows(10, 3, 2, group_size=2)
    sizes = [[b.stop - b.start for b in w] for w in windows]
    assert sizes == [[4, 4], [2]]
    assert all(b.start % 2 == 0 for w in windows for b in w)
    assert [[b.stop - b.start for b in w] for w in batching.accumulation_windows(5, 2, 2)] == [[2, 2], [1]]
    sample = {"latents": torch.arange(6.0).reshape(2, 3), "advantages": torch.tensor([1.0, 2.0])}
    stacked = batching.stack_steps(sample, slice(1, 3))
    assert stacked["latents"].tolist() == [1.0, 2.0, 4.0, 5.0]
    assert stacked["advantages"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert [(s.start, s.stop) for s in batching.step_chunks(5, 2)] == [(0, 2), (2, 4), (4, 5)]


def test_sample_batches_unpack_like_trls_lists():
    batch = SampleBatch([torch.zeros(2, 3, 4, 4), ("a", "b"), ({}, {})])
    images, prompts, metadata = batch
    assert prompts == ("a", "b") and batch.prompts is prompts and batch[:3] == [images, prompts, metadata]
    with pytest.raises(AttributeError, match="not been scored"):
        batch.rewards
    batch.extend([torch.ones(2), {"x": 1}])
    *_, rewards, reward_metadata = batch
    assert torch.equal(batch.rewards, rewards) and reward_metadata == {"x": 1}


def test_every_stage_reports_its_phase_timings(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, num_epochs=1)
    trainer.train()
    stats = trainer.last_stage_stats
    for phase in ("sampling", "rewards", "training"):
        assert isinstance(stats[f"time/{phase}"], float) and stats[f"time/{phase}"] > 0
    assert stats["time/sampling"] + stats["time/training"] > stats["time/rewards"]
    assert np.isfinite(stats["loss"])


def test_resolution_sets_the_image_size_and_is_checked(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, resolution=24)
    assert trainer.image_size == (24, 24)
    _, batches = trainer._generate_samples(iterations=1, batch_size=1, branch_point=4)
    assert batches[0].images.shape[-2:] == (24, 24)
    assert make_trainer(tiny_model_dir).image_size == (16, 16)  # the tiny model's own: 8 latent px x factor 2
    with pytest.raises(ValueError, match="multiple of the VAE's scale factor 2, got 25"):
        make_trainer(tiny_model_dir, resolution=25)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        trainer = make_trainer(tiny_model_dir, gradient_checkpointing=checkpointing)
        assert trainer.denoiser.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=3)
        sample = samples[0]
        trainer.training_denoiser.train()
        batch = {**sample, "advantages": torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -2.0])}
        out = trainer.micro_batch_loss(batching.stack_steps(batch, slice(0, 3)))
        out.loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.trainable_params]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_stacked_steps_keep_the_members_of_a_pair_adjacent_at_each_step():
    # rows 0/1 are a pair, rows 2/3 another; values encode (row, step)
    sample = {
        "log_probs": torch.arange(4)[:, None] * 10.0 + torch.arange(3)[None, :],
        "row_weight": torch.tensor([1.0, 1.0, 0.0, 0.0]),
    }
    stacked = batching.stack_steps(sample, slice(1, 3), group_size=2)
    assert stacked["log_probs"].tolist() == [1.0, 11.0, 2.0, 12.0, 21.0, 31.0, 22.0, 32.0]
    assert stacked["row_weight"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def _samples(total: int, steps: int) -> dict:
    """`total` rows of `steps` transitions: timesteps name the step, log_probs are unique per transition."""
    return {
        "timesteps": (torch.arange(steps) * 10).repeat(total, 1),
        "log_probs": torch.arange(total * steps, dtype=torch.float32).reshape(total, steps),
        "advantages": torch.arange(total, dtype=torch.float32),
    }


def test_a_small_micro_batch_stacks_more_steps_up_to_a_full_calls_rows():
    samples = _samples(2, 6)  # 2 kept samples, 6 interval steps
    calls = list(batching.micro_batches(samples, batch_size=4, accumulation_steps=1, steps_per_forward=1))
    # 2 samples fill a call of 4 rows by stacking 2 steps: 3 calls instead of 6
    assert [batch["timesteps"].shape[0] for batch, _, _ in calls] == [4, 4, 4]
    assert sum(scale for _, scale, _ in calls) == pytest.approx(1.0) and calls[-1][2]
    seen = sorted(float(x) for batch, _, _ in calls for x in batch["log_probs"])
    assert seen == sorted(float(x) for x in samples["log_probs"].reshape(-1))  # every transition once
    # 5 samples in micro-batches of 4: the full one keeps 2 steps per call, the single sample stacks 8 (all 6)
    calls = list(batching.micro_batches(_samples(5, 6), batch_size=4, accumulation_steps=2, steps_per_forward=2))
    assert [batch["timesteps"].shape[0] for batch, _, _ in calls] == [8, 8, 8, 6]
    assert sum(scale for _, scale, _ in calls) == pytest.approx(1.0)
    # a pair loss: one pair in micro-batches of 4 rows stacks 2 steps, the pair adjacent at each step
    pairs = batching.micro_batches(_samples(2, 4), batch_size=4, accumulation_steps=1, group_size=2)
    for batch, _, _ in pairs:
        assert batch["timesteps"].shape[0] == 4 and torch.equal(batch["timesteps"][0::2], batch["timesteps"][1::2])


def test_load_pipeline_loads_in_the_dtype_asked_for(tiny_model_dir):
    from b2trl import load_pipeline

    half = load_pipeline(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    assert load_pipeline(tiny_model_dir).unet.dtype == torch.float32
