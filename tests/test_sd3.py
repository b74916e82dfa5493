"""Stable Diffusion 3 as a model family with the flow-matching SDE sampler, on a tiny random SD3 pipeline (offline).

The exactness checks: with noise_level 0 the branch rollout is diffusers' own sampling; the SDE step's
log-probability is its Gaussian's, and a recorded transition recomputes to the same value (ratio 1 on-policy).
"""

import math

import pytest
import torch

from b2trl import batching
from b2trl.models import Conditioning, StableDiffusion3Family
from b2trl.rollout import branch_rollout
from b2trl.samplers import FlowSDESampler
from helpers import brightness_reward, cycling_prompts, make_trainer, max_change, small_config, torchrun_tiny

T5_LENGTH = 16  # the tiny model's tokenizer_3.model_max_length (diffusers would pad to 256)


@pytest.fixture(scope="module")
def sd3_dir(tiny_sd3_dir):
    return tiny_sd3_dir


def _lora(pipeline) -> dict:
    return {n: p.detach().clone() for n, p in pipeline.transformer.named_parameters() if "lora" in n}


def _transformer_calls(transformer, calls):
    """Record every transformer call: (rows, timesteps, whether gradients were on)."""

    def hook(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].detach().clone(), torch.is_grad_enabled()))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _guided(pipeline, prompts):
    """Conditioning with guidance, the empty negative prompt encoded once per row as diffusers encodes it (a
    batch of one can differ from it in the last bit of CLIP's projection)."""
    family, pipe = pipeline.family, pipeline.sd_pipeline
    with torch.no_grad():
        cond = family.encode_prompts(pipe, prompts, "cpu")
        return Conditioning(cond, family.encode_prompts(pipe, [""] * len(prompts), "cpu"))


# ---------------------------------------------------------------------- the family


def test_load_pipeline_picks_sd3_and_encodes_prompts_as_diffusers_does(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from b2trl import load_pipeline

    pipeline = load_pipeline(sd3_dir)
    pipe = pipeline.sd_pipeline
    assert isinstance(pipeline.family, StableDiffusion3Family) and pipeline.denoiser is pipe.transformer
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    assert not any(p.requires_grad for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
                   for p in getattr(pipe, name).parameters())
    sampler = pipeline.family.make_sampler(small_config(noise_level=0.3, prefix_sde=True))
    assert isinstance(sampler, FlowSDESampler) and sampler.noise_level == 0.3 and sampler.prefix_sampler() is sampler

    family, prompts = pipeline.family, ["a cat", "a dog"]
    with torch.no_grad():
        cond = family.encode_prompts(pipe, prompts, "cpu")
        uncond = family.encode_negative(pipe, "", "cpu", None)
        blurry = family.encode_negative(pipe, "blurry", "cpu", None)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device="cpu", max_sequence_length=T5_LENGTH
        )
        # one prompt, so that diffusers encodes its negative prompt in a batch of one too, as the trainer does
        _, negative, _, negative_pooled = pipe.encode_prompt(
            "a cat", None, None, device="cpu", max_sequence_length=T5_LENGTH
        )
        _, blurry_embeds, _, blurry_pooled = pipe.encode_prompt(
            "a cat", None, None, device="cpu", negative_prompt="blurry", max_sequence_length=T5_LENGTH
        )
    # CLIP's 16 tokens, then T5's 16, at T5's width; the pooled projections of both CLIP encoders side by side
    assert cond["encoder_hidden_states"].shape == (2, 16 + T5_LENGTH, 32)
    assert cond["pooled_projections"].shape == (2, 8 + 16)
    for ours, theirs in [(cond["encoder_hidden_states"], embeds), (cond["pooled_projections"], pooled),
                         (uncond["encoder_hidden_states"], negative), (uncond["pooled_projections"], negative_pooled),
                         (blurry["encoder_hidden_states"], blurry_embeds),
                         (blurry["pooled_projections"], blurry_pooled)]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    # without T5 (the memory saving): zeros of the same shape, as diffusers gives them
    no_t5 = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None)
    with torch.no_grad():
        ours = family.encode_prompts(no_t5, prompts, "cpu")["encoder_hidden_states"]
        theirs = no_t5.encode_prompt(prompts, None, None, device="cpu", max_sequence_length=T5_LENGTH)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.shape == cond["encoder_hidden_states"].shape and not ours[:, 16:].any()


def test_latents_are_shifted_and_scaled_as_the_vae_says(sd3_dir):
    from b2trl import load_pipeline

    pipeline = load_pipeline(sd3_dir)
    pipe, family = pipeline.sd_pipeline, pipeline.family
    vae = pipe.vae
    assert vae.config.shift_factor == 0.0609 and vae.config.scaling_factor == 1.5305
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = family.encode_images(pipe, images, generator=torch.Generator().manual_seed(1))
        raw = vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(1))
        decoded = family.decode(pipe, latents)
        expected = (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(latents, (raw - 0.0609) * 1.5305, rtol=0, atol=0)
    torch.testing.assert_close(decoded, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the SDE step


def _schedule(steps=4):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    FlowSDESampler().timesteps(scheduler, steps, "cpu")
    return scheduler


def test_sde_step_at_noise_level_0_is_the_scheduler_euler_step():
    scheduler, generator = _schedule(), torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):  # σ = 1 included
        x, v = torch.randn(3, 16, 4, 4, generator=generator), torch.randn(3, 16, 4, 4, generator=generator)
        scheduler._step_index = i
        expected = scheduler.step(v, t, x).prev_sample
        t_batch = FlowSDESampler(0.0).timestep_batch(t, 3, "cpu")
        assert t_batch.dtype == torch.float32 and torch.equal(t_batch, t.expand(3))
        out = FlowSDESampler(0.0).step(scheduler, v, t_batch, x, generator=generator)
        mean, std = FlowSDESampler(0.0).mean_and_std(scheduler, v, t_batch, x)
        assert torch.equal(out.prev_sample, expected) and torch.equal(mean, expected)
        assert not std.any() and out.log_prob.isnan().all()  # the ODE has no log-probability
        assert torch.equal(FlowSDESampler(0.7).ode_step(scheduler, v, t_batch, x), expected)


def test_sde_log_prob_is_its_gaussian_and_a_given_sample_scores_as_drawn():
    scheduler, generator = _schedule(), torch.Generator().manual_seed(0)
    sampler = FlowSDESampler(0.7)
    # rows at different steps of the schedule, the first at σ = 1
    t = scheduler.timesteps[torch.tensor([0, 1, 2, 3])]
    x, v = torch.randn(4, 16, 4, 4, generator=generator), torch.randn(4, 16, 4, 4, generator=generator)
    out = sampler.step(scheduler, v, t, x, generator=generator)
    mean, std = sampler.mean_and_std(scheduler, v, t, x)
    gaussian = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, gaussian, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out.log_prob).all() and (std > 0).all()
    scored = sampler.step(scheduler, v, t, x, prev_sample=out.prev_sample)
    assert torch.equal(scored.prev_sample, out.prev_sample) and torch.equal(scored.log_prob, out.log_prob)
    # one row at a time gives the same values (each row finds its own σ)
    for i in range(4):
        row = slice(i, i + 1)
        single = sampler.step(scheduler, v[row], t[row], x[row], prev_sample=out.prev_sample[row])
        assert torch.equal(single.log_prob, out.log_prob[row])

    # the formulas, by hand, at the second row's σ
    sigmas = scheduler.sigmas
    sigma, dt = sigmas[1], sigmas[2] - sigmas[1]
    std_t = 0.7 * math.sqrt(sigma / (1 - sigma))
    expected = x[1] * (1 + std_t**2 / (2 * sigma) * dt) + v[1] * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(mean[1], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std[1].reshape(()), torch.tensor(std_t * math.sqrt(-dt)), rtol=1e-6, atol=0)
    # at σ = 1 the noise scale takes the next sigma in its denominator
    std_1 = 0.7 * math.sqrt(1 / (1 - sigmas[1])) * math.sqrt(sigmas[0] - sigmas[1])
    torch.testing.assert_close(std[0].reshape(()), torch.tensor(std_1), rtol=1e-6, atol=0)

    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        sampler.step(scheduler, v[:1], torch.tensor([123.0]), x[:1])


def test_noise_level_is_validated_by_name(sd3_dir):
    assert FlowSDESampler(0.7).validation_errors() == []
    for bad in (0.0, -1.0, float("nan")):
        (error,) = FlowSDESampler(bad).validation_errors()
        assert error.startswith("noise_level must be > 0")
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        make_trainer(sd3_dir, noise_level=0.0)


# ---------------------------------------------------------------------- the branch rollout


def test_rollout_at_noise_level_0_reproduces_the_diffusers_pipeline(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from b2trl import load_pipeline

    pipeline = load_pipeline(sd3_dir)
    prompts = ["a red circle", "a blue square"]
    conditioning = _guided(pipeline, prompts)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.0), num_inference_steps=6, branch_point=2,
                         num_branches=3, guidance_scale=4.0, latents=latents)

    reference = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    seen = {}

    def keep(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return tensors

    with torch.no_grad():
        images = reference(prompts, num_inference_steps=6, guidance_scale=4.0, latents=latents, output_type="pt",
                           max_sequence_length=T5_LENGTH, callback_on_step_end=keep).images
    assert images.shape == (2, 3, 16, 16) and 0.05 < images.std()
    torch.testing.assert_close(out.images, images.repeat_interleave(3, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(out.branch_latents, seen[1], rtol=0, atol=0)

    # with the SDE in the interval, the default prefix is still the ODE: the branch point is diffusers' latent
    sde = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.7), num_inference_steps=6, branch_point=2,
                         num_branches=3, guidance_scale=4.0, latents=latents)
    torch.testing.assert_close(sde.branch_latents, seen[1], rtol=0, atol=0)
    assert (sde.images[0] - sde.images[1]).abs().max() > 0  # the branches differ after it
    noisy_prefix = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.7, prefix_sde=True),
                                  num_inference_steps=6, branch_point=2, num_branches=3, guidance_scale=4.0,
                                  latents=latents)
    assert (noisy_prefix.branch_latents - seen[1]).abs().max() > 1e-3


@pytest.mark.parametrize("resolution", [16, 32])
def test_a_resolution_dependent_shift_gives_the_pipeline_schedule_and_image(sd3_dir, resolution):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from b2trl import load_pipeline

    pipeline = load_pipeline(sd3_dir)
    config = dict(pipeline.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    pipeline.sd_pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    with pytest.raises(ValueError, match="needs mu"):
        FlowSDESampler().timesteps(pipeline.scheduler, 6, "cpu")
    prompts = ["a red circle", "a blue square"]
    size = resolution // 2  # latent pixels (the VAE downsamples by 2)
    latents = torch.randn(2, 16, size, size, generator=torch.Generator().manual_seed(0))
    out = branch_rollout(pipeline, _guided(pipeline, prompts), sampler=FlowSDESampler(0.0), num_inference_steps=6,
                         branch_point=3, num_branches=2, guidance_scale=4.0, latents=latents,
                         image_size=(resolution, resolution))
    ours = pipeline.scheduler.sigmas.clone()

    reference = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    reference.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    with torch.no_grad():
        images = reference(prompts, num_inference_steps=6, guidance_scale=4.0, latents=latents, output_type="pt",
                           height=resolution, width=resolution, max_sequence_length=T5_LENGTH).images
    torch.testing.assert_close(ours, reference.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(out.images, images.repeat_interleave(2, dim=0), rtol=0, atol=0)
    # the shift depends on the size: 16 px has 16 tokens of the patch-2 transformer, 32 px has 64
    plain = FlowMatchEulerDiscreteScheduler.from_config(dict(config, use_dynamic_shifting=False))
    plain.set_timesteps(6)
    assert not torch.allclose(ours, plain.sigmas)


def test_rollout_has_the_b2_shape_with_float_timesteps(sd3_dir):
    trainer = make_trainer(sd3_dir, sample_num_steps=5, sample_num_batches_per_epoch=1)
    assert isinstance(trainer.sampler, FlowSDESampler) and trainer.sampler.noise_level == 0.7
    calls = []
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        samples, batches = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    finally:
        handle.remove()
    # prefix: 2 prompts x CFG; interval: 2 prompts x 3 branches x CFG
    assert [rows for rows, _, _ in calls] == [2 * 2] * 2 + [2 * 2 * 3] * 3
    schedule = trainer.sd_pipeline.scheduler.timesteps
    assert [float(t[0]) for _, t, _ in calls] == schedule.tolist() and not any(grad for *_, grad in calls)
    assert all(t.dtype == torch.float32 for _, t, _ in calls)
    sample = samples[0]
    assert sample["latents"].shape == (6, 3, 16, 8, 8) and batches[0].images.shape == (6, 3, 16, 16)
    assert sample["timesteps"].dtype == torch.float32 and torch.equal(sample["timesteps"][0], schedule[2:])
    assert {"cond.encoder_hidden_states", "cond.pooled_projections", "uncond.pooled_projections"} <= set(sample)
    assert torch.isfinite(sample["log_probs"]).all()


def test_recomputed_log_probs_equal_the_recorded_ones_in_other_batch_sizes(sd3_dir):
    trainer = make_trainer(sd3_dir)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=3)
    sample = samples[0]  # sampled as one batch of 6 rows per step
    with torch.no_grad():
        for rows in (slice(0, 4), slice(4, 6), slice(1, 2)):
            part = {k: v[rows] for k, v in sample.items()}
            # every interval step of these rows in one call, as training stacks them
            flat = batching.stack_steps(part, slice(0, 3))
            recomputed = trainer.transition_log_prob(
                flat["latents"], flat["timesteps"], flat["next_latents"], Conditioning.from_rows(flat)
            )
            # fp32 throughout: the same numbers, so the importance ratio is exactly 1
            assert torch.equal(recomputed, flat["log_probs"])
            assert torch.equal(torch.exp(recomputed - flat["log_probs"]), torch.ones(len(recomputed)))
        j = 1
        transition = (sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j])
        _, approx_kl, clipfrac = trainer.calculate_loss(
            *transition, sample["log_probs"][:, j], torch.ones(6), Conditioning.from_rows(sample)
        )
    assert float(approx_kl) < 1e-10 and float(clipfrac) == 0.0


# ---------------------------------------------------------------------- training and weights


def test_training_touches_only_the_interval_and_the_lora_round_trips_through_diffusers(sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from b2trl import B2DiffuRLTrainer, load_pipeline

    config = small_config(train_learning_rate=1e-2, selection_rule="all", num_epochs=2)
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), load_pipeline(sd3_dir))
    before = _lora(trainer.sd_pipeline)
    assert before and all(".attn2." not in n for n in before)  # diffusers' SD3 targets: the joint attention
    trainer.train(epochs=1)
    calls = []
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        trainer.train(epochs=2)  # stage 1
    finally:
        handle.remove()
    stats = trainer.last_stage_stats
    assert stats["stage"] == 1 and stats["samples_kept"] == 12 and stats["optimizer_steps"] > 0
    interval = set(trainer.sd_pipeline.scheduler.timesteps[stats["branch_point"] :].tolist())
    trained = [(rows, t) for rows, t, grad in calls if grad]
    assert trained and {float(x) for _, t in trained for x in t} == interval  # every interval step, nothing else
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0

    out = str(tmp_path / "lora")
    trainer.save_pretrained(out)
    state = StableDiffusion3Pipeline.lora_state_dict(out)
    assert state and all(k.startswith("transformer.") for k in state)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and "- sd3" in card and "flow-matching SDE" in card
    # the snippet pads T5 as the model was trained (diffusers' default of 256 would not)
    length = trainer.sd_pipeline.tokenizer_3.model_max_length
    assert f"max_sequence_length={length}" in card
    loaded = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    loaded.load_lora_weights(out)
    plain = StableDiffusion3Pipeline.from_pretrained(sd3_dir)

    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), float(trainer.sd_pipeline.scheduler.timesteps[3]))
    cond = trainer.encode(["a cat", "a dog"]).cond
    family = trainer.family
    with torch.no_grad():
        ours = family.forward(trainer.sd_pipeline.transformer, latents, t, cond)
        theirs = family.forward(loaded.transformer, latents, t, cond)
        untrained = family.forward(plain.transformer, latents, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (untrained - ours).abs().max() > 1e-4  # the comparison can tell a trained LoRA from none

    # and a new run continues from it: the weights go into its own adapter
    resumed = make_trainer(sd3_dir)
    resumed.load_lora_weights(out)
    with torch.no_grad():
        again = family.forward(resumed.sd_pipeline.transformer, latents, t, cond)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def test_a_pipeline_loaded_without_t5_trains(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from b2trl import B2DiffuRLTrainer
    from b2trl.models import wrap_pipeline

    pipeline = wrap_pipeline(StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None))
    config = small_config(num_epochs=1, selection_rule="all", train_learning_rate=1e-2)
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), pipeline)
    assert isinstance(trainer.family, StableDiffusion3Family)
    before = _lora(trainer.sd_pipeline)
    trainer.train()
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0


def test_dpo_is_log_2_at_the_reference_and_the_kl_term_runs(sd3_dir):
    trainer = make_trainer(sd3_dir, loss_type="dpo", kl_coef=0.1)
    torch.manual_seed(0)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=3)
    rows = torch.tensor([0, 1, 3, 4])  # two (winner, loser) pairs, branches of the same prompt
    batch = {k: v[rows] for k, v in samples[0].items()}
    batch["row_weight"] = torch.ones(4)
    batch["advantages"] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch.update(trainer.reference_pass(batch))
    torch.testing.assert_close(batch["ref_log_probs"], batch["log_probs"], rtol=0, atol=1e-6)
    trainer.training_denoiser.train()
    out = trainer.micro_batch_loss(batching.stack_steps(batch, slice(0, 3), group_size=2))
    out.loss.backward()
    assert abs(float(out.loss.detach()) - math.log(2)) < 1e-6  # the KL term at the reference is 0
    assert float(out.stats["kl_ref"]) < 1e-10
    assert max(float(p.grad.abs().max()) for p in trainer.trainable_params) > 0
    trainer.optimizer.zero_grad()

    before = _lora(trainer.sd_pipeline)
    trainer.train(epochs=2)
    assert "dpo_margin" in trainer.last_stage_stats and "kl_ref" in trainer.last_stage_stats
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0


def test_two_processes_end_with_identical_weights(sd3_dir, tmp_path):
    stages = torchrun_tiny(sd3_dir, tmp_path, "--epochs", "2", timeout=240)
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["max_weight_diff_across_ranks"] == 0.0 for s in stages)
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"]


def test_a_start_anchored_interval_finishes_each_branch_with_the_ode_unless_asked(sd3_dir):
    from b2trl import IntervalSchedule
    from b2trl.rollout import decode_latents

    schedule = IntervalSchedule(initial_length=2, num_stages=4, anchor="start")
    trainer = make_trainer(sd3_dir, interval_schedule=schedule, sample_num_batches_per_epoch=1,
                           selection_rule="all", train_learning_rate=1e-2)
    assert "untrained suffix: ODE" in trainer.sampler.describe()
    assert trainer.sampler.suffix_sampler().noise_level == 0
    assert FlowSDESampler(0.7, suffix_sde=True).suffix_sampler().noise_level == 0.7
    pipeline = trainer.sd_pipeline
    conditioning = trainer.encode(["a cat", "a dog"])
    out = branch_rollout(pipeline, conditioning, sampler=trainer.sampler, num_inference_steps=6, branch_point=0,
                         interval_end=2, num_branches=2, generator=torch.Generator().manual_seed(0))
    schedule_t = pipeline.scheduler.timesteps
    assert out.latents.shape[:2] == (4, 2) and torch.equal(out.timesteps[0], schedule_t[:2])
    # the suffix is the ODE: finishing the recorded interval's last latent with it gives the same images
    family, ode = trainer.family, FlowSDESampler(0.0)
    latents, branched = out.next_latents[:, -1], conditioning.repeat_interleave(2)
    with torch.no_grad():
        for t in schedule_t[2:]:
            t_batch = ode.timestep_batch(t, latents.shape[0], latents.device)
            guidance = trainer.config.sample_guidance_scale
            prediction = family.predict(pipeline.transformer, latents, t_batch, branched, guidance)
            latents = ode.step(pipeline.scheduler, prediction, t_batch, latents).prev_sample
    torch.testing.assert_close(decode_latents(pipeline, latents), out.images, rtol=0, atol=1e-5)

    # training sees only the first two steps
    calls = []
    handle = _transformer_calls(pipeline.transformer, calls)
    try:
        trainer.step(0, 0)
    finally:
        handle.remove()
    trained = {float(x) for rows, t, grad in calls if grad for x in t}
    assert trained == set(schedule_t[:2].tolist())
