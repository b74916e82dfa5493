"""Qwen-Image as a model family, on a tiny random QwenImagePipeline (offline).

The exactness checks: prompts encode to the pipeline's tensors; with noise_level 0 the branch rollout is the
pipeline's own sampling (true CFG with its rescale, the schedule's resolution-dependent shift); a recorded
transition recomputes to the same log-probability; a trained LoRA loads in the pipeline and gives the same images.

Calls in the exactness checks have at least four rows: on a CPU, a matrix product of fewer rows can round
differently from the same rows in a larger batch, for any model.
"""

import math

import pytest
import torch

from b2trl import batching
from b2trl.models import Conditioning, QwenImageFamily
from b2trl.models.qwenimage import call_text, pack_latents, unpack_latents
from b2trl.rollout import branch_rollout
from b2trl.samplers import FlowSDESampler
from helpers import brightness_reward, cycling_prompts, make_trainer, max_change, small_config, torchrun_tiny

SIZE = 16  # pixels: 8x8 latents (the tiny VAE downsamples by 2), 4x4 = 16 image tokens
PROMPTS = ["a red circle", "a cat", "a blue square on a table", "a dog in snow"]  # four different token lengths


@pytest.fixture(scope="module")
def qwen_dir(tiny_qwenimage_dir):
    return tiny_qwenimage_dir


@pytest.fixture(scope="module")
def pipeline(qwen_dir):
    from b2trl import load_pipeline

    return load_pipeline(qwen_dir)


def _reference(qwen_dir):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guided(pipeline, prompts, negative=""):
    """The prompts' conditioning with the negative prompt's row for each, as the trainer builds it."""
    family, pipe = pipeline.family, pipeline.sd_pipeline
    with torch.no_grad():
        negative_row = family.encode_negative(pipe, negative, "cpu", None)
        return Conditioning(
            family.encode_prompts(pipe, prompts, "cpu"),
            {k: v.repeat(len(prompts), *([1] * (v.dim() - 1))) for k, v in negative_row.items()},
        )


def _transformer_calls(transformer, calls):
    """Record every transformer call: (image rows, text rows, timesteps, whether gradients were on)."""

    def hook(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"].shape[0],
                      kwargs["timestep"].detach().clone(), torch.is_grad_enabled()))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _lora(pipeline) -> dict:
    return {n: p.detach().clone() for n, p in pipeline.transformer.named_parameters() if "lora" in n}


# ---------------------------------------------------------------------- the family


def test_load_pipeline_picks_qwenimage_and_encodes_prompts_as_diffusers_does(pipeline):
    pipe, family = pipeline.sd_pipeline, pipeline.family
    assert isinstance(family, QwenImageFamily) and pipeline.denoiser is pipe.transformer
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift_terminal == 0.02
    assert not any(p.requires_grad for name in ("text_encoder", "vae") for p in getattr(pipe, name).parameters())
    assert isinstance(family.make_sampler(small_config()), FlowSDESampler)
    # the tiny tokenizer splits the template's system part into 34 tokens, as Qwen's does
    template = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(template).input_ids) == pipe.prompt_template_encode_start_idx == 34

    with torch.no_grad():
        cond = family.encode_prompts(pipe, PROMPTS, "cpu")
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
        same_length = family.encode_prompts(pipe, ["a cat", "a dog"], "cpu")
        same_embeds, same_mask = pipe.encode_prompt(["a cat", "a dog"], device="cpu", max_sequence_length=512)
        negatives = {text: (family.encode_negative(pipe, text, "cpu", None), pipe.encode_prompt(text, device="cpu"))
                     for text in ("", "blurry, low quality")}
    # stored: every row padded to max_sequence_length, its real tokens marked, the batch's longest length on each
    lengths = cond["encoder_hidden_states_mask"].sum(dim=1)
    assert cond["encoder_hidden_states"].shape == (4, 512, 32) and len(set(lengths.tolist())) == 4
    assert torch.equal(cond["text_length"], torch.full((4,), int(lengths.max())))
    assert not cond["encoder_hidden_states"][cond["encoder_hidden_states_mask"] == 0].any()
    # cut for a call, exactly the pipeline's tensors, its mask included
    text, text_mask = call_text(cond)
    torch.testing.assert_close(text, embeds, rtol=0, atol=0)
    assert text_mask is not None and torch.equal(text_mask, mask)
    # prompts of one length: the pipeline drops the mask, and so does the call
    text, text_mask = call_text(same_length)
    torch.testing.assert_close(text, same_embeds, rtol=0, atol=0)
    assert same_mask is None and text_mask is None
    for ours, (theirs, their_mask) in negatives.values():
        text, text_mask = call_text(ours)
        torch.testing.assert_close(text, theirs, rtol=0, atol=0)
        assert text_mask is None and their_mask is None


def test_max_sequence_length_truncates_as_the_pipeline_and_is_validated(pipeline, caplog):
    pipe = pipeline.sd_pipeline
    short = QwenImageFamily(max_sequence_length=6)
    with torch.no_grad(), caplog.at_level("WARNING"):
        cond = short.encode_prompts(pipe, PROMPTS, "cpu")
        embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=6)
    assert "keeps max_sequence_length=6" in caplog.text
    text, text_mask = call_text(cond)
    assert cond["encoder_hidden_states"].shape[1] == 6
    torch.testing.assert_close(text, embeds, rtol=0, atol=0)
    assert text_mask is None and mask is None  # every prompt fills the 6 tokens
    assert short.pipeline_call_kwargs(pipe) == {"max_sequence_length": 6}
    for bad in (0, 1025, 12.0, True):
        with pytest.raises(ValueError, match=r"max_sequence_length must be an int in \[1, 1024\]"):
            QwenImageFamily(max_sequence_length=bad)


def test_padding_is_masked_out_of_the_prediction(pipeline):
    """A prompt padded further (a call that mixes rows of two prompt batches) predicts the same up to rounding;
    without its mask the padding would change the prediction."""
    pipe, family = pipeline.sd_pipeline, pipeline.family
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 800.0)
    with torch.no_grad():
        short = family.encode_prompts(pipe, ["a cat"] * 4, "cpu")
        alone = family.forward(pipe.transformer, latents, t, short)
        padded = dict(short, text_length=torch.full((4,), 20))  # as if encoded with a 20-token prompt
        assert call_text(padded)[0].shape[1] == 20 and call_text(padded)[1] is not None
        mixed = family.forward(pipe.transformer, latents, t, padded)
        unmasked = family.forward(pipe.transformer, latents, t, dict(padded, encoder_hidden_states_mask=torch.ones(
            4, 512, dtype=torch.long)))
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-6)
    assert (unmasked - alone).abs().max() > 1e-3


def test_latents_are_packed_and_decoded_as_the_pipeline_does(pipeline):
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 16, 8, 8))
    assert torch.equal(unpack_latents(packed, 8, 8), latents)
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, SIZE, SIZE, 2)[:, :, 0], latents)
    family, pipe = pipeline.family, pipeline.sd_pipeline
    assert family.latent_shape(pipe, 2, (SIZE, 32)) == (2, 16, 8, 16)
    assert family.image_size(pipe) == (256, 256) and family.image_size(pipe, 32) == (32, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        family.image_size(pipe, 18)


# ---------------------------------------------------------------------- the branch rollout


def test_rollout_at_noise_level_0_reproduces_the_diffusers_pipeline(pipeline, qwen_dir):
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    run = dict(num_inference_steps=6, branch_point=2, num_branches=3, guidance_scale=4.0, latents=latents,
               image_size=(SIZE, SIZE))
    out = branch_rollout(pipeline, _guided(pipeline, PROMPTS), sampler=FlowSDESampler(0.0), **run)

    reference = _reference(qwen_dir)
    seen = {}

    def keep(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return tensors

    call = dict(height=SIZE, width=SIZE, num_inference_steps=6, latents=pack_latents(latents), output_type="pt")
    with torch.no_grad():
        images = reference(PROMPTS, negative_prompt="", true_cfg_scale=4.0, callback_on_step_end=keep, **call).images
        plain = reference(PROMPTS, true_cfg_scale=1.0, **call).images
    assert images.shape == (4, 3, SIZE, SIZE) and 0.05 < images.std()
    torch.testing.assert_close(out.images, images.repeat_interleave(3, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(pack_latents(out.branch_latents), seen[1], rtol=0, atol=0)
    assert (plain - images).abs().max() > 1e-3  # the guidance shows

    # without guidance: one row per sample, and the pipeline without a negative prompt
    with torch.no_grad():
        unguided = Conditioning(pipeline.family.encode_prompts(pipeline.sd_pipeline, PROMPTS, "cpu"))
    out = branch_rollout(pipeline, unguided, sampler=FlowSDESampler(0.0), **run)
    torch.testing.assert_close(out.images, plain.repeat_interleave(3, dim=0), rtol=0, atol=0)

    # with the SDE in the interval the default prefix is still the ODE: the branch point is the pipeline's latent
    sde = branch_rollout(pipeline, _guided(pipeline, PROMPTS), sampler=FlowSDESampler(0.7), **run)
    torch.testing.assert_close(pack_latents(sde.branch_latents), seen[1], rtol=0, atol=0)
    assert (sde.images[0] - sde.images[1]).abs().max() > 0


@pytest.mark.parametrize("resolution", [16, 32])
def test_the_resolution_dependent_shift_gives_the_pipeline_schedule_and_image(pipeline, qwen_dir, resolution):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from b2trl.models.base import resolution_shift

    config = pipeline.scheduler.config
    # mu as the pipeline computes it, to the bit, for any token count
    for tokens in range(1, 5000):
        assert resolution_shift(config, tokens) == calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    side = resolution // 2  # latent pixels
    latents = torch.randn(4, 16, side, side, generator=torch.Generator().manual_seed(1))
    out = branch_rollout(pipeline, _guided(pipeline, PROMPTS), sampler=FlowSDESampler(0.0), num_inference_steps=5,
                         branch_point=3, num_branches=1, guidance_scale=3.0, latents=latents,
                         image_size=(resolution, resolution))
    ours = pipeline.scheduler.sigmas.clone()
    reference = _reference(qwen_dir)
    with torch.no_grad():
        images = reference(PROMPTS, negative_prompt="", true_cfg_scale=3.0, height=resolution, width=resolution,
                           num_inference_steps=5, latents=pack_latents(latents), output_type="pt").images
    torch.testing.assert_close(ours, reference.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(out.images, images, rtol=0, atol=0)
    # 16 px is 16 image tokens, 32 px is 64: the shift, and so the schedule, differs
    other = 32 if resolution == 16 else 16
    kwargs = pipeline.family.schedule_kwargs(pipeline, 5, (other, other))
    FlowSDESampler().timesteps(reference.scheduler, 5, "cpu", **kwargs)
    assert not torch.allclose(ours, reference.scheduler.sigmas)


def test_true_cfg_is_rescaled_to_the_conditional_norm_and_runs_only_when_asked(pipeline):
    family, pipe = pipeline.family, pipeline.sd_pipeline
    conditioning = _guided(pipeline, PROMPTS, negative="blurry")
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((4,), 700.0)
    with torch.no_grad():
        guided = family.predict(pipe.transformer, latents, t, conditioning, 4.0)
        cond = pack_latents(family.forward(pipe.transformer, latents, t, conditioning.cond))
        uncond = pack_latents(family.forward(pipe.transformer, latents, t, conditioning.uncond))
    # by hand, per image token over its 64 packed channels
    combined = uncond + 4.0 * (cond - uncond)
    expected = combined * cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(pack_latents(guided), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pack_latents(guided).norm(dim=-1), cond.norm(dim=-1), rtol=1e-5, atol=0)
    assert (pack_latents(guided) - combined).abs().max() > 1e-3  # the rescale is not a no-op

    assert family.uses_guidance(small_config()) and family.uses_guidance(small_config(sample_guidance_scale=1.5))
    assert not family.uses_guidance(small_config(train_cfg=False))
    assert not family.uses_guidance(small_config(sample_guidance_scale=1.0))
    # the pipeline call's guidance: true_cfg_scale with a negative prompt, never the distilled guidance_scale
    assert family.guidance_call_kwargs(small_config(sample_guidance_scale=4.0)) == {
        "true_cfg_scale": 4.0, "negative_prompt": "", "guidance_scale": None}
    assert family.guidance_call_kwargs(small_config(sample_guidance_scale=4.0, negative_prompts="blurry"))[
        "negative_prompt"] == "blurry"
    assert family.guidance_call_kwargs(small_config(sample_guidance_scale=1.0, negative_prompts="blurry")) == {
        "true_cfg_scale": 1.0, "guidance_scale": None}


def test_rollout_has_the_b2_shape_with_float_timesteps(qwen_dir):
    for guidance, calls_per_step in ((5.0, 2), (1.0, 1)):
        trainer = make_trainer(qwen_dir, resolution=SIZE, sample_num_steps=5, sample_guidance_scale=guidance)
        assert (trainer.negative_conditioning is not None) == (calls_per_step == 2)
        calls = []
        handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
        try:
            samples, batches = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
        finally:
            handle.remove()
        # prefix: 2 prompts; interval: 2 prompts x 3 branches; with guidance a second call, its negative one row
        rows = [2] * 2 + [6] * 3
        assert [r for r, *_ in calls] == [r for r in rows for _ in range(calls_per_step)]
        text_rows = [n for r in rows for n in ((r, 1) if calls_per_step == 2 else (r,))]
        assert [tr for _, tr, _, _ in calls] == text_rows
        schedule = trainer.sd_pipeline.scheduler.timesteps
        assert [float(t[0]) * 1000 for _, _, t, _ in calls[::calls_per_step]] == pytest.approx(schedule.tolist())
        assert not any(grad for *_, grad in calls)
        sample = samples[0]
        assert sample["latents"].shape == (6, 3, 16, 8, 8) and batches[0].images.shape == (6, 3, SIZE, SIZE)
        assert torch.equal(sample["timesteps"][0], schedule[2:]) and torch.isfinite(sample["log_probs"]).all()
        keys = {"cond.encoder_hidden_states", "cond.encoder_hidden_states_mask", "cond.text_length"}
        assert keys <= set(sample) and ("uncond.encoder_hidden_states" in sample) == (calls_per_step == 2)


def test_recomputed_log_probs_equal_the_recorded_ones_in_other_batch_sizes(qwen_dir):
    trainer = make_trainer(qwen_dir, resolution=SIZE)
    trainer.prompt_fn = cycling_prompts(("a red circle", "a blue square on a table"))  # padded to the longer
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    sample = samples[0]  # sampled as one batch of 6 rows per step, 4 interval steps
    assert sample["cond.encoder_hidden_states_mask"].sum(1).unique().numel() == 2
    with torch.no_grad():
        for rows in (slice(0, 6), slice(0, 4), slice(4, 6), slice(1, 2)):
            part = {k: v[rows] for k, v in sample.items()}
            # every interval step of these rows in one call, as training stacks them
            flat = batching.stack_steps(part, slice(0, 4))
            recomputed = trainer.transition_log_prob(
                flat["latents"], flat["timesteps"], flat["next_latents"], Conditioning.from_rows(flat)
            )
            # fp32 throughout: the same numbers, so the importance ratio is exactly 1
            assert torch.equal(recomputed, flat["log_probs"])
        j = 1
        transition = (sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j])
        _, approx_kl, clipfrac = trainer.calculate_loss(
            *transition, sample["log_probs"][:, j], torch.ones(6), Conditioning.from_rows(sample)
        )
    assert float(approx_kl) < 1e-10 and float(clipfrac) == 0.0

    # rows of another prompt batch in the same call pad the shorter prompt further: equal up to rounding
    trainer.prompt_fn = cycling_prompts(("a dog",))
    other, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    mixed = {k: torch.cat([sample[k][4:], other[0][k][:2]]) for k in sample}
    flat = batching.stack_steps(mixed, slice(0, 4))
    with torch.no_grad():
        recomputed = trainer.transition_log_prob(
            flat["latents"], flat["timesteps"], flat["next_latents"], Conditioning.from_rows(flat)
        )
    assert (recomputed - flat["log_probs"]).abs().max() < 1e-5


# ---------------------------------------------------------------------- training and weights


def test_training_touches_only_the_interval_and_the_lora_round_trips_through_diffusers(qwen_dir, tmp_path,
                                                                                        monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    from b2trl import B2DiffuRLTrainer, load_pipeline
    from b2trl.hub import sample_for_card

    config = small_config(train_learning_rate=1e-2, selection_rule="all", num_epochs=2, resolution=SIZE,
                          sample_guidance_scale=4.0)
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), load_pipeline(qwen_dir))
    before = _lora(trainer.sd_pipeline)
    targets = {name.split(".lora_")[0].split(".", 2)[-1] for name in before}
    assert targets == set(QwenImageFamily.lora_target_modules)  # attention and both MLPs
    # but not the last block's text output and text MLP, whose output the transformer drops (no gradient)
    last = {name.split(".lora_")[0] for name in before if name.startswith("transformer_blocks.1.")}
    assert len(last) == len(targets) - 3 and not any("txt_mlp" in n or "to_add_out" in n for n in last)
    trainer.train(epochs=1)
    calls = []
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        trainer.train(epochs=2)  # stage 1
    finally:
        handle.remove()
    stats = trainer.last_stage_stats
    assert stats["stage"] == 1 and stats["samples_kept"] == 12 and stats["optimizer_steps"] > 0
    interval = set(trainer.sd_pipeline.scheduler.timesteps[stats["branch_point"]:].tolist())
    trained = [t for _, _, t, grad in calls if grad]
    assert trained and {round(float(x) * 1000, 2) for t in trained for x in t} == {round(x, 2) for x in interval}
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0

    out = str(tmp_path / "lora")
    trainer.save_pretrained(out)
    reference = _reference(qwen_dir)
    state = type(reference).lora_state_dict(out)
    assert state and all(k.startswith("transformer.") for k in state)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "QwenImagePipeline" in card and "- qwen-image" in card and "flow-matching SDE" in card
    # the snippet samples as training did: the text length, true CFG with the negative prompt, the size
    assert "true_cfg_scale=4.0, negative_prompt='', max_sequence_length=512, height=16, width=16)" in card

    # the pipeline with the saved LoRA draws the trained model's images
    reference.load_lora_weights(out)
    latents = pack_latents(torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3)))
    call = dict(negative_prompt="", true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=4,
                latents=latents, output_type="pt")
    trained_pipe = trainer.sd_pipeline.sd_pipeline
    with torch.no_grad():
        ours = trained_pipe(PROMPTS, **call).images
        theirs = reference(PROMPTS, **call).images
        untrained = _reference(qwen_dir)(PROMPTS, **call).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (untrained - ours).abs().max() > 1e-3  # the comparison can tell a trained LoRA from none

    # card samples are the pipeline's with the run's guidance and size
    card_images = sample_for_card(trainer.sd_pipeline, ["a cat"], [0], config)
    with torch.no_grad():
        direct = trained_pipe(["a cat"], negative_prompt="", true_cfg_scale=4.0, height=SIZE, width=SIZE,
                              num_inference_steps=config.sample_num_steps, max_sequence_length=512,
                              generator=[torch.Generator().manual_seed(0)], output_type="pt").images
    assert card_images.shape == (1, 1, 3, SIZE, SIZE)
    torch.testing.assert_close(card_images[0], direct, rtol=0, atol=0)

    # push_to_hub (offline): the weights and the card
    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("Url", (str,), {"repo_id": repo_id})(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kw: uploaded.update(
        files=sorted(__import__("os").listdir(folder_path)),
        card=ModelCard.load(__import__("os").path.join(folder_path, "README.md"))))
    assert trainer.push_to_hub("me/qwen-b2") == "https://huggingface.co/me/qwen-b2"
    assert uploaded["files"] == ["README.md", "pytorch_lora_weights.safetensors"]
    assert "qwen-image" in uploaded["card"].data.tags and 'load_lora_weights("me/qwen-b2")' in uploaded["card"].text

    # and a new run continues from it: the weights go into its own adapter
    resumed = make_trainer(qwen_dir, resolution=SIZE)
    resumed.load_lora_weights(out)
    t, cond = torch.full((4,), 700.0), trainer.encode(PROMPTS).cond
    lat = unpack_latents(latents, 8, 8)
    with torch.no_grad():
        again = trainer.family.forward(resumed.sd_pipeline.transformer, lat, t, cond)
        expected = trainer.family.forward(trainer.sd_pipeline.transformer, lat, t, cond)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_full_fine_tuning_trains_and_saves_a_loadable_pipeline(qwen_dir, tmp_path):
    trainer = make_trainer(qwen_dir, use_lora=False, resolution=SIZE, selection_rule="all", num_epochs=1,
                           train_learning_rate=1e-3, sample_guidance_scale=1.0, gradient_checkpointing=True)
    assert trainer.denoiser.gradient_checkpointing
    # the last block's text output is dropped by the transformer: not trained (DDP refuses gradient-less parameters)
    frozen = {n for n, p in trainer.denoiser.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("transformer_blocks.1.attn.to_add_out", "transformer_blocks.1.txt_mlp"))
                          for n in frozen)
    before = {n: p.detach().clone() for n, p in trainer.sd_pipeline.transformer.named_parameters()}
    trainer.train()
    after = {n: p.detach() for n, p in trainer.sd_pipeline.transformer.named_parameters()}
    assert max(float((before[n] - after[n]).abs().max()) for n in before) > 0
    trainer.save_pretrained(str(tmp_path / "full"))
    reloaded = _reference(str(tmp_path / "full"))
    latents, t = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(4)), torch.full((4,), 700.0)
    cond = trainer.encode(PROMPTS).cond
    with torch.no_grad():
        ours = trainer.family.forward(trainer.sd_pipeline.transformer, latents, t, cond)
        theirs = trainer.family.forward(reloaded.transformer, latents, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_dpo_is_log_2_at_the_reference_and_the_kl_term_runs(qwen_dir):
    trainer = make_trainer(qwen_dir, resolution=SIZE, loss_type="dpo", kl_coef=0.1)
    torch.manual_seed(0)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    rows = torch.tensor([0, 1, 3, 4])  # two (winner, loser) pairs, branches of the same prompt
    batch = {k: v[rows] for k, v in samples[0].items()}
    batch["row_weight"] = torch.ones(4)
    batch["advantages"] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch.update(trainer.reference_pass(batch))  # the base model: the adapter switched off
    torch.testing.assert_close(batch["ref_log_probs"], batch["log_probs"], rtol=0, atol=1e-6)
    trainer.training_denoiser.train()
    out = trainer.micro_batch_loss(batching.stack_steps(batch, slice(0, 4), group_size=2))
    out.loss.backward()
    assert abs(float(out.loss.detach()) - math.log(2)) < 1e-6 and float(out.stats["kl_ref"]) < 1e-10
    assert max(float(p.grad.abs().max()) for p in trainer.trainable_params) > 0


def test_two_processes_end_with_identical_weights(qwen_dir, tmp_path):
    stages = torchrun_tiny(qwen_dir, tmp_path, "--epochs", "2", "--resolution", str(SIZE), timeout=240)
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["max_weight_diff_across_ranks"] == 0.0 for s in stages)
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"]
    assert not math.isnan(stages[-1]["reward_mean"])


# ---------------------------------------------------------------------- Qwen-Image's shape and the cost benchmark


def test_qwenimage_shaped_pipeline_has_its_published_sizes():
    from b2trl.testing import build_qwenimage_pipeline

    with torch.device("meta"):  # the architecture without allocating 28.8 B parameters
        pipe = build_qwenimage_pipeline(resolution=512)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    config = pipe.transformer.config
    assert count(pipe.transformer) == 20_430_401_088  # the "20 B MMDiT"
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (60, 24, 128)
    assert (config.in_channels, config.out_channels, config.joint_attention_dim) == (64, 16, 3584)
    assert tuple(config.axes_dims_rope) == (16, 56, 56) and not config.guidance_embeds
    encoder = pipe.text_encoder
    assert count(encoder) == 8_292_166_656  # Qwen2.5-VL-7B-Instruct: language model, LM head, vision tower
    assert count(encoder.model.language_model) == 7_070_619_136 and count(encoder.model.visual) == 676_550_144
    assert encoder.config.text_config.hidden_size == config.joint_attention_dim
    assert len(pipe.tokenizer) <= encoder.config.text_config.vocab_size == 152064
    assert count(pipe.vae) == 126_892_531 and pipe.vae_scale_factor == 8 and pipe.vae.config.z_dim == 16
    assert pipe.default_sample_size * pipe.vae_scale_factor == 512  # the pipeline samples at the given size
    assert pipe.scheduler.config.max_shift == 0.9 and pipe.scheduler.config.max_image_seq_len == 8192
    with pytest.raises(ValueError, match="multiple of 16"):
        build_qwenimage_pipeline(resolution=520)


def test_cost_benchmark_runs_b2_and_plain_qwenimage_sampling(monkeypatch):
    from diffusers import QwenImagePipeline

    from helpers import load_script

    cost = load_script(__import__("pathlib").Path(__file__).parents[1] / "benchmarks" / "cost.py", "cost_qwen")
    args = cost.parse_args(["--qwenimage-random", "--methods", "b2", "plain"])
    assert args.resolution == 1024 and args.random_model and args.reward == "random"
    for wrong in (["--qwenimage-random"], ["--qwenimage-random", "--sd3-random", "--methods", "b2"],
                  ["--qwenimage-random", "--resolution", "72", "--methods", "b2"]):
        with pytest.raises(SystemExit):
            cost.parse_args(wrong)

    calls = []
    call = QwenImagePipeline.__call__

    def recorded(self, *a, **kwargs):
        calls.append(kwargs)
        return call(self, *a, **kwargs)

    monkeypatch.setattr(QwenImagePipeline, "__call__", recorded)
    report = cost.main(["--in-process", "--num-steps", "4", "--interval", "2", "--prompts", "2", "--branches", "3",
                        "--train-batch-size", "2", "--qwenimage-random", "--tiny-width", "--resolution", "64",
                        "--methods", "b2", "plain", "--plain-batch-size", "4"])
    b2, plain = report["methods"]["b2"], report["methods"]["plain"]
    T, L, B, N = 4, 2, 2, 3
    # true CFG: two calls per step (prompts, then the negative prompt), the same rows as one call of both halves
    assert b2["unet_rows"]["sampling"] == 2 * (B * (T - L) + B * N * L) == 32
    assert b2["unet_calls"]["sampling"] == 2 * T
    assert b2["unet_rows"]["training"] == 2 * b2["samples_kept"] * L > 0 and b2["vae_decode_rows"] == 6
    assert all(check["ok"] for check in report["checks"].values())
    # plain QwenImagePipeline sampling: two batches of 4 at 64 px with true CFG, prompts at the family's length
    assert plain["images"] == 8 and plain["unet_rows"]["sampling"] == 2 * 8 * T and plain["vae_decode_rows"] == 8
    assert len(calls) == 2 and all(kw["true_cfg_scale"] == 5.0 and kw["max_sequence_length"] == 512
                                   and "guidance_scale" not in kw for kw in calls)
