"""FLUX.1 as a model family, on tiny random FLUX.1-dev- and schnell-shaped pipelines (offline).

The exactness checks: with noise_level 0 the branch rollout is `FluxPipeline`'s own sampling, at the pipeline's
resolution-dependent schedule; prompts encode to `encode_prompt`'s tensors; a recorded transition recomputes to
the same log-probability (ratio 1 on-policy); a saved LoRA loads in `FluxPipeline.load_lora_weights`.

MKL's CPU matrix products give the rows of a call with fewer than 4 rows, and with several threads the rows of a
partial block, other last bits than the same rows inside a larger call. The guided families always double their
rows; FLUX runs one row per sample, so the bitwise comparisons below run on one thread with at least 4 rows per
denoiser call (4 prompts, or interval steps stacked), where a row's result does not depend on its batch.
"""

import math

import numpy as np
import pytest
import torch

from b2trl import batching
from b2trl.models import Conditioning, FluxFamily, family_for_class
from b2trl.models.flux import image_ids, pack_latents, t5_sequence_length, unpack_latents
from b2trl.rollout import branch_rollout
from b2trl.samplers import FlowSDESampler
from helpers import brightness_reward, cycling_prompts, make_trainer, max_change, small_config, torchrun_tiny

T5_LENGTH = 16  # the tiny model's tokenizer_2.model_max_length (FluxPipeline would pad to 512)
PROMPTS = ["a red circle", "a blue square", "a cat", "a dog"]
RESOLUTION = 16  # FluxPipeline's own default, 128 x the VAE's factor, is far too large for a CPU test


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir):
    return tiny_flux_dir


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    """A tiny FLUX.1-schnell-shaped pipeline (no guidance embedding, no shift) saved to disk."""
    from b2trl.testing import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("tiny-flux-schnell")
    build_tiny_flux_pipeline(str(folder), guidance_embeds=False, t5_max_length=T5_LENGTH, seed=1)
    return str(folder)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(pipeline) -> dict:
    return {n: p.detach().clone() for n, p in pipeline.transformer.named_parameters() if "lora" in n}


def _transformer_calls(transformer, calls):
    """Record every transformer call: (rows, timesteps, guidance, whether gradients were on)."""

    def hook(module, args, kwargs):
        guidance = kwargs["guidance"]
        calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].detach().clone(),
                      None if guidance is None else guidance.detach().clone(), torch.is_grad_enabled()))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------- the family


def test_load_pipeline_picks_flux_and_encodes_prompts_as_diffusers_does(flux_dir, schnell_dir):
    from b2trl import load_pipeline

    pipeline = load_pipeline(flux_dir)
    pipe, family = pipeline.sd_pipeline, pipeline.family
    assert isinstance(family, FluxFamily) and pipeline.denoiser is pipe.transformer
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.use_dynamic_shifting
    assert not any(p.requires_grad for name in ("text_encoder", "text_encoder_2", "vae")
                   for p in getattr(pipe, name).parameters())
    config = small_config(noise_level=0.9, train_cfg=True)
    sampler = family.make_sampler(config)
    assert isinstance(sampler, FlowSDESampler) and sampler.noise_level == 0.9
    assert not family.uses_guidance(config)  # the guidance is the transformer's input, whatever train_cfg says
    suggested = small_config(**FluxFamily.suggested_settings)  # real config fields, valid together
    assert (suggested.noise_level, suggested.sample_guidance_scale, suggested.mixed_precision) == (0.9, 3.5, "bf16")
    with pytest.raises(ValueError, match="b2trl trains .*FluxPipeline"):
        family_for_class("FluxKontextPipeline")  # an edit pipeline is not a FluxPipeline

    with torch.no_grad():
        cond = family.encode_prompts(pipe, PROMPTS, "cpu")
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=T5_LENGTH)
    assert cond["encoder_hidden_states"].shape == (4, T5_LENGTH, 32) and cond["pooled_projections"].shape == (4, 16)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert text_ids.shape == (T5_LENGTH, 3) and not text_ids.any()  # what forward builds from the length

    # the guidance value of every row: the run's sample_guidance_scale, in float32 as FluxPipeline passes it
    inputs = family.sampling_inputs(pipe, small_config(sample_guidance_scale=3.5), 4, "cpu")
    assert set(inputs) == {"guidance"} and torch.equal(inputs["guidance"], torch.full((4,), 3.5))
    schnell = load_pipeline(schnell_dir).sd_pipeline
    assert family.sampling_inputs(schnell, config, 4, "cpu") == {}

    # T5's length: the tokenizer's, at most 512, at most 256 without a guidance embedding (schnell)
    assert t5_sequence_length(pipe) == T5_LENGTH
    for length, dev, fast in ((512, 512, 256), (int(1e30), 512, 256), (128, 128, 128), (1024, 512, 256)):
        pipe.tokenizer_2.model_max_length = schnell.tokenizer_2.model_max_length = length
        assert (t5_sequence_length(pipe), t5_sequence_length(schnell)) == (dev, fast)
    assert family.pipeline_call_kwargs(pipe) == {"max_sequence_length": 512}


def test_packing_and_position_ids_are_the_pipelines(flux_dir):
    from diffusers import FluxPipeline

    latents = torch.randn(3, 16, 6, 10, generator=torch.Generator().manual_seed(0))  # not square
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # the pipeline unpacks from pixel sizes (its VAE factor, here 2, times the latent size)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12, 20, 2), latents)
    assert torch.equal(image_ids(3, 5, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32))


def test_latent_shape_image_size_and_decoding(flux_dir, caplog):
    from b2trl import load_pipeline

    pipeline = load_pipeline(flux_dir)
    pipe, family = pipeline.sd_pipeline, pipeline.family
    assert family.image_size(pipe) == (256, 256)  # FluxPipeline's default_sample_size x the VAE's factor
    assert family.image_size(pipe, 16) == (16, 16)
    with pytest.raises(ValueError, match="multiple of 4 for FLUX"):
        family.image_size(pipe, 18)  # a multiple of the VAE's factor, but not of its 2x2 packing
    assert family.latent_shape(pipe, 2, (16, 32)) == (2, 16, 8, 16)

    vae = pipe.vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = family.encode_images(pipe, images, generator=torch.Generator().manual_seed(1))
        raw = vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(1))
        decoded = family.decode(pipe, latents)
        expected = (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611, rtol=0, atol=0)
    torch.testing.assert_close(decoded, expected, rtol=1e-6, atol=1e-6)

    with caplog.at_level("WARNING", logger="b2trl.models.flux"):
        family.place(pipe, "cpu", torch.float16, use_lora=True)
    assert "mixed_precision='bf16'" in caplog.text


# ---------------------------------------------------------------------- the schedule


def test_schedule_kwargs_are_what_flux_pipeline_passes(flux_dir, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux as pipeline_flux

    from b2trl.models.base import resolution_shift

    # the shift is computed in the pipelines' order of operations: the same mu to the last bit
    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for tokens in range(1, 5000):
        assert resolution_shift(config, tokens) == pipeline_flux.calculate_shift(tokens)

    pipe = _reference(flux_dir)
    family = FluxFamily()
    seen = []
    retrieve = pipeline_flux.retrieve_timesteps

    def recorded(scheduler, num_inference_steps, device, **kwargs):
        seen.append(kwargs)
        return retrieve(scheduler, num_inference_steps, device, **kwargs)

    monkeypatch.setattr(pipeline_flux, "retrieve_timesteps", recorded)
    for size in ((16, 16), (32, 32), (16, 32)):
        with torch.no_grad():
            pipe("a cat", num_inference_steps=5, height=size[0], width=size[1], max_sequence_length=T5_LENGTH,
                 output_type="latent")
        ours = family.schedule_kwargs(pipe, 5, size)
        assert set(ours) == set(seen[-1]) == {"sigmas", "mu"}
        assert np.array_equal(ours["sigmas"], seen[-1]["sigmas"]) and ours["mu"] == seen[-1]["mu"]
    # 16, 64 and 32 packed image tokens: three shifts, 0.5 at the scheduler's 4 tokens to 1.15 at its 64
    assert [s["mu"] for s in seen] == pytest.approx([0.5 + 0.65 * 12 / 60, 1.15, 0.5 + 0.65 * 28 / 60])


# ---------------------------------------------------------------------- the branch rollout


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (16, 32)])
def test_rollout_at_noise_level_0_reproduces_flux_pipeline(flux_dir, one_thread, size):
    from b2trl import load_pipeline

    pipeline = load_pipeline(flux_dir)
    family, pipe = pipeline.family, pipeline.sd_pipeline
    with torch.no_grad():
        conditioning = Conditioning(family.encode_prompts(pipe, PROMPTS, "cpu"))  # no guidance: predict adds it
    latents = torch.randn(4, 16, size[0] // 2, size[1] // 2, generator=torch.Generator().manual_seed(0))
    out = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.0), num_inference_steps=6, branch_point=2,
                         num_branches=3, guidance_scale=3.5, latents=latents, image_size=size)
    ours = pipeline.scheduler.sigmas.clone()

    reference, seen = _reference(flux_dir), {}

    def keep(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return tensors

    with torch.no_grad():
        images = reference(PROMPTS, num_inference_steps=6, guidance_scale=3.5, latents=pack_latents(latents),
                           height=size[0], width=size[1], max_sequence_length=T5_LENGTH, output_type="pt",
                           callback_on_step_end=keep).images
    assert images.shape == (4, 3, *size) and 0.05 < images.std()
    torch.testing.assert_close(ours, reference.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(out.images, images.repeat_interleave(3, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(pack_latents(out.branch_latents), seen[1], rtol=0, atol=0)

    # another guidance value is another image: the embedded guidance reaches the transformer
    other = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.0), num_inference_steps=6,
                           branch_point=2, num_branches=1, guidance_scale=1.5, latents=latents, image_size=size)
    assert (other.images - images).abs().max() > 1e-3
    sde = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.9), num_inference_steps=6, branch_point=2,
                         num_branches=3, guidance_scale=3.5, latents=latents, image_size=size)
    torch.testing.assert_close(sde.branch_latents, out.branch_latents, rtol=0, atol=0)  # the prefix is the ODE
    assert (sde.images[0] - sde.images[1]).abs().max() > 0


def test_schnell_has_no_guidance_and_reproduces_its_pipeline(schnell_dir, one_thread):
    from b2trl import load_pipeline

    pipeline = load_pipeline(schnell_dir)
    family, pipe = pipeline.family, pipeline.sd_pipeline
    assert not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.use_dynamic_shifting
    with torch.no_grad():
        conditioning = Conditioning(family.encode_prompts(pipe, PROMPTS, "cpu"))
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = _transformer_calls(pipe.transformer, calls)
    try:
        out = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.0), num_inference_steps=4,
                             branch_point=1, num_branches=2, guidance_scale=3.5, latents=latents,
                             image_size=(RESOLUTION, RESOLUTION))
    finally:
        handle.remove()
    assert calls and all(guidance is None for _, _, guidance, _ in calls)
    with torch.no_grad():
        images = _reference(schnell_dir)(PROMPTS, num_inference_steps=4, guidance_scale=0.0,
                                         latents=pack_latents(latents), height=RESOLUTION, width=RESOLUTION,
                                         max_sequence_length=T5_LENGTH, output_type="pt").images
    torch.testing.assert_close(out.images, images.repeat_interleave(2, dim=0), rtol=0, atol=0)


def test_rollout_has_the_b2_shape_and_stores_the_guidance_it_sampled_with(flux_dir):
    trainer = make_trainer(flux_dir, resolution=RESOLUTION, sample_num_steps=5, sample_guidance_scale=3.5,
                           sample_num_batches_per_epoch=1)
    assert trainer.negative_conditioning is None  # no unconditional half, whatever train_cfg says
    calls = []
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        samples, batches = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    finally:
        handle.remove()
    # prefix: 2 prompts, one row each; interval: 2 prompts x 3 branches; no CFG doubling
    assert [rows for rows, *_ in calls] == [2] * 2 + [2 * 3] * 3
    schedule = trainer.sd_pipeline.scheduler.timesteps
    assert [float(t[0]) * 1000 for _, t, _, _ in calls] == pytest.approx(schedule.tolist(), rel=1e-6)
    assert all(torch.equal(g, torch.full_like(g, 3.5)) for _, _, g, _ in calls) and not any(c[-1] for c in calls)
    sample = samples[0]
    assert sample["latents"].shape == (6, 3, 16, 8, 8) and batches[0].images.shape == (6, 3, 16, 16)
    assert set(k for k in sample if k.startswith(("cond.", "uncond."))) == {
        "cond.encoder_hidden_states", "cond.pooled_projections", "cond.guidance"}
    assert torch.equal(sample["cond.guidance"], torch.full((6,), 3.5)) and torch.isfinite(sample["log_probs"]).all()

    # training evaluates every row with the guidance it was sampled with, whatever the config says now
    trainer.config.sample_guidance_scale = 7.0
    calls.clear()
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        flat = batching.stack_steps({k: v[:2] for k, v in sample.items()}, slice(0, 3))
        with torch.no_grad():
            trainer.transition_log_prob(flat["latents"], flat["timesteps"], flat["next_latents"],
                                        Conditioning.from_rows(flat))
    finally:
        handle.remove()
    assert torch.equal(calls[0][2], torch.full((6,), 3.5))


def test_recomputed_log_probs_equal_the_recorded_ones_in_other_batch_sizes(flux_dir, one_thread):
    trainer = make_trainer(flux_dir, resolution=RESOLUTION)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    sample = samples[0]  # sampled as one batch of 6 rows per interval step, 4 steps
    with torch.no_grad():
        for rows in (slice(0, 4), slice(4, 6), slice(1, 2)):  # micro-batches of 4, 2 and 1 samples
            part = {k: v[rows] for k, v in sample.items()}
            flat = batching.stack_steps(part, slice(0, 4))  # every interval step in one call, as training stacks
            recomputed = trainer.transition_log_prob(
                flat["latents"], flat["timesteps"], flat["next_latents"], Conditioning.from_rows(flat)
            )
            assert torch.equal(recomputed, flat["log_probs"])
            assert torch.equal(torch.exp(recomputed - flat["log_probs"]), torch.ones(len(recomputed)))
        j = 1
        transition = (sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j])
        _, approx_kl, clipfrac = trainer.calculate_loss(
            *transition, sample["log_probs"][:, j], torch.ones(6), Conditioning.from_rows(sample)
        )
    assert float(approx_kl) == 0.0 and float(clipfrac) == 0.0


# ---------------------------------------------------------------------- training and weights


def test_training_touches_only_the_interval_and_the_lora_round_trips_through_diffusers(flux_dir, tmp_path):
    from b2trl import B2DiffuRLTrainer, load_pipeline

    config = small_config(train_learning_rate=1e-2, selection_rule="all", num_epochs=2, resolution=RESOLUTION,
                          sample_guidance_scale=3.5)
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), load_pipeline(flux_dir))
    before = _lora(trainer.sd_pipeline)
    adapted = {n.split(".lora_A")[0] for n in before if ".lora_A." in n}
    double = {f"transformer_blocks.0.{m}" for m in FluxFamily.lora_target_modules}
    single = {f"single_transformer_blocks.0.attn.to_{m}" for m in "qkv"}  # no to_out in a single-stream block
    assert adapted == double | single
    trainer.train(epochs=1)
    calls = []
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        trainer.train(epochs=2)  # stage 1
    finally:
        handle.remove()
    stats = trainer.last_stage_stats
    assert stats["stage"] == 1 and stats["samples_kept"] == 12 and stats["optimizer_steps"] > 0
    interval = trainer.sd_pipeline.scheduler.timesteps[stats["branch_point"]:]
    trained = {round(float(x) * 1000, 2) for rows, t, _, grad in calls if grad for x in t}
    assert trained == {round(float(t), 2) for t in interval}  # every interval step, nothing else
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0

    out = str(tmp_path / "lora")
    trainer.save_pretrained(out)
    loaded, plain = _reference(flux_dir), _reference(flux_dir)
    state = loaded.lora_state_dict(out)
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    loaded.load_lora_weights(out)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "FluxPipeline" in card and "- flux" in card and "flow-matching SDE" in card
    assert f"guidance_scale=3.5, max_sequence_length={T5_LENGTH}" in card

    # the trained in-memory pipeline and the base with the saved LoRA sample the same images
    trained_pipe = trainer.sd_pipeline.sd_pipeline
    trained_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    call = dict(num_inference_steps=4, guidance_scale=3.5, latents=pack_latents(latents), height=RESOLUTION,
                width=RESOLUTION, max_sequence_length=T5_LENGTH, output_type="pt")
    with torch.no_grad():
        ours = trained_pipe(["a cat", "a dog"], **call).images
        theirs = loaded(["a cat", "a dog"], **call).images
        untrained = plain(["a cat", "a dog"], **call).images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (untrained - ours).abs().max() > 1e-4  # the comparison can tell a trained LoRA from none

    # and a new run continues from it: the weights go into its own adapter
    resumed = make_trainer(flux_dir, resolution=RESOLUTION)
    resumed.load_lora_weights(out)
    t = torch.full((2,), float(trainer.sd_pipeline.scheduler.timesteps[3]))
    cond = dict(trainer.encode(["a cat", "a dog"]).cond)
    with torch.no_grad():
        expected = trainer.family.forward(trainer.sd_pipeline.transformer, latents, t, cond)
        again = trainer.family.forward(resumed.sd_pipeline.transformer, latents, t, cond)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_full_fine_tuning_saves_a_flux_pipeline_that_loads(flux_dir, tmp_path):
    trainer = make_trainer(flux_dir, use_lora=False, resolution=RESOLUTION, train_learning_rate=1e-3,
                           selection_rule="all")
    before = {n: p.detach().clone() for n, p in trainer.sd_pipeline.transformer.named_parameters()}
    trainer.train(epochs=1)
    after = {n: p.detach().clone() for n, p in trainer.sd_pipeline.transformer.named_parameters()}
    assert max_change(before, after) > 0
    trainer.save_pretrained(str(tmp_path / "full"))
    reloaded = _reference(str(tmp_path / "full"))
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = trainer.encode(["a cat", "a dog"]).cond
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        ours = trainer.family.forward(trainer.sd_pipeline.transformer, latents, t, cond)
        theirs = trainer.family.forward(reloaded.transformer, latents, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_dpo_is_log_2_at_the_reference(flux_dir):
    trainer = make_trainer(flux_dir, resolution=RESOLUTION, loss_type="dpo", kl_coef=0.1)
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
    assert abs(float(out.loss.detach()) - math.log(2)) < 1e-6 and float(out.stats["kl_ref"]) < 1e-10
    assert max(float(p.grad.abs().max()) for p in trainer.trainable_params) > 0


def test_push_to_hub_uploads_the_lora_and_a_flux_card(flux_dir, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    uploads = []

    class RepoUrl(str):
        repo_id = "me/b2-flux"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: RepoUrl("https://huggingface.co/x"))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        import os

        uploads.append((repo_id, sorted(os.listdir(folder_path)), ModelCard.load(f"{folder_path}/README.md")))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    # train_cfg off: FLUX still samples with its embedded guidance (only the classifier-free kind is off)
    trainer = make_trainer(flux_dir, resolution=RESOLUTION, train_cfg=False, sample_guidance_scale=2.5)
    assert trainer.family.guidance_call_kwargs(trainer.config) == {"guidance_scale": 2.5}
    trainer.train(epochs=1)
    trainer.push_to_hub("me/b2-flux")
    ((repo, files, card),) = uploads
    assert repo == "me/b2-flux" and files == ["README.md", "pytorch_lora_weights.safetensors"]
    assert {"flux", "lora", "b2-diffurl"} <= set(card.data.tags) and flux_dir not in card.text
    assert 'FluxPipeline.from_pretrained(' in card.text and 'load_lora_weights("me/b2-flux")' in card.text
    assert "guidance_scale=2.5" in card.text


def test_two_processes_end_with_identical_weights(flux_dir, tmp_path):
    stages = torchrun_tiny(flux_dir, tmp_path, "--epochs", "2", "--resolution", str(RESOLUTION), timeout=240)
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["max_weight_diff_across_ranks"] == 0.0 for s in stages)
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"]
