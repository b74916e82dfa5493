"""Z-Image as a model family, on a tiny random ZImagePipeline (offline, with a local Qwen-style tokenizer).

The exactness checks: prompts encode to the pipeline's per-prompt embeddings; the schedule is the one the pipeline
passes to set_timesteps; with noise_level 0 the branch rollout is the pipeline's own sampling (with guidance, with
its normalisation and truncation, and without guidance as Turbo samples); a recorded transition recomputes to the
same log-probability in other batch sizes.
"""

import functools
import math

import pytest
import torch

from b2trl import batching
from b2trl.models import Conditioning, ZImageFamily
from b2trl.rollout import branch_rollout
from b2trl.samplers import FlowSDESampler
from helpers import brightness_reward, cycling_prompts, make_trainer, max_change, small_config, torchrun_tiny

# the second prompt is longer than 32 tokens after the chat template, so the batch mixes caption lengths that the
# transformer pads differently (31 and 69 tokens; the empty negative prompt has 19)
PROMPTS = ("a red circle", "a blue square, a much longer prompt than the first")


@pytest.fixture(scope="module")
def zimage_dir(tiny_zimage_dir):
    return tiny_zimage_dir


def _load(folder, family=None):
    from b2trl import load_pipeline

    pipeline = load_pipeline(folder)
    if family is not None:
        pipeline.family = family
    return pipeline


def _reference(folder, scheduler_config=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_config is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return pipe


def _lora(pipeline) -> dict:
    return {n: p.detach().clone() for n, p in pipeline.transformer.named_parameters() if "lora" in n}


def _transformer_calls(transformer, calls):
    """Record every transformer call: (rows, the transformer's time input, whether gradients were on)."""

    def hook(module, args, kwargs):
        calls.append((len(kwargs["x"]), kwargs["t"].detach().clone(), torch.is_grad_enabled()))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _guided(pipeline, prompts=PROMPTS):
    """Conditioning with the empty negative prompt encoded once per row, as the pipeline encodes it."""
    family, pipe = pipeline.family, pipeline.sd_pipeline
    with torch.no_grad():
        return Conditioning(family.encode_prompts(pipe, list(prompts), "cpu"),
                            family.encode_prompts(pipe, [""] * len(prompts), "cpu"))


def _pipeline_images(pipe, prompts=PROMPTS, **kwargs):
    with torch.no_grad():  # a copy of the prompts: the pipeline rewrites its list in place with the chat template
        return pipe(list(prompts), output_type="pt", **kwargs).images


# ---------------------------------------------------------------------- the family


def test_load_pipeline_picks_zimage_and_encodes_prompts_as_the_pipeline_does(zimage_dir):
    pipeline = _load(zimage_dir)
    pipe, family = pipeline.sd_pipeline, pipeline.family
    assert isinstance(family, ZImageFamily) and pipeline.denoiser is pipe.transformer
    assert type(pipe.text_encoder).__name__ == "Qwen3Model" and type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert not any(p.requires_grad for name in ("text_encoder", "vae") for p in getattr(pipe, name).parameters())
    sampler = family.make_sampler(small_config(noise_level=0.3))
    assert isinstance(sampler, FlowSDESampler) and sampler.noise_level == 0.3

    # the chat template: a user turn and the assistant's opening, no thinking block with enable_thinking=True
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"

    long_prompt = "a very long prompt " * 40  # 760 characters: cut at 512 tokens as the pipeline cuts it
    prompts = list(PROMPTS) + [long_prompt]
    with torch.no_grad():
        cond = family.encode_prompts(pipe, prompts, "cpu")
        blurry = family.encode_negative(pipe, "blurry", "cpu", None)
        embeds, negative = pipe.encode_prompt(list(prompts), device="cpu", negative_prompt=["blurry"] * 3)
    assert cond["prompt_embeds"].shape == (3, 512, 32) and cond["prompt_length"].tolist() == [31, 69, 512]
    for i in range(3):
        n = int(cond["prompt_length"][i])
        torch.testing.assert_close(cond["prompt_embeds"][i, :n], embeds[i], rtol=0, atol=0)
        assert not cond["prompt_embeds"][i, n:].any()  # zeros after the prompt
    n = int(blurry["prompt_length"][0])
    torch.testing.assert_close(blurry["prompt_embeds"][0, :n], negative[0], rtol=0, atol=0)

    # the LoRA targets exist: attention and feed-forward of every block, refiners included
    names = {name for name, _ in pipe.transformer.named_modules()}
    for target in family.lora_target_modules:
        assert {f"layers.0.{target}", f"noise_refiner.0.{target}", f"context_refiner.0.{target}"} <= names


def test_guidance_follows_the_pipeline_convention_and_bad_options_are_refused():
    family = ZImageFamily()
    # the pipeline guides whenever guidance_scale > 0: 1.0 still guides, 0 (Turbo) does not
    assert family.uses_guidance(small_config(sample_guidance_scale=1.0))
    assert not family.uses_guidance(small_config(sample_guidance_scale=0.0))
    assert not family.uses_guidance(small_config(train_cfg=False))
    assert family.guidance_call_kwargs(small_config(sample_guidance_scale=4.0, negative_prompts="blurry")) == {
        "guidance_scale": 4.0, "negative_prompt": "blurry"}
    assert family.guidance_call_kwargs(small_config(sample_guidance_scale=4.0, train_cfg=False)) == {
        "guidance_scale": 0.0}
    assert family.pipeline_call_kwargs(None) == {}
    custom = ZImageFamily(cfg_normalization=True, cfg_truncation=0.6)
    assert custom.pipeline_call_kwargs(None) == {"cfg_normalization": 1.0, "cfg_truncation": 0.6}
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cfg_normalization must be"):
            ZImageFamily(cfg_normalization=bad)
    with pytest.raises(ValueError, match="cfg_truncation must be"):
        ZImageFamily(cfg_truncation=float("nan"))
    with pytest.raises(ValueError, match="multiple of 4"):
        _ = family.image_size(type("P", (), {"vae_scale_factor": 2})(), 18)


def test_the_default_resolution_is_the_vaes_sample_size_or_the_pipelines_1024(zimage_dir):
    from diffusers import AutoencoderKL

    pipe = _load(zimage_dir).sd_pipeline
    assert ZImageFamily().image_size(pipe) == (16, 16)  # the tiny VAE's sample_size
    # a VAE config without sample_size would read as AutoencoderKL's default of 32: the pipeline's 1024 instead
    vae = AutoencoderKL.from_config({k: v for k, v in pipe.vae.config.items() if k != "sample_size"})
    assert vae.config.sample_size == 32
    unset = type("P", (), {"vae_scale_factor": 2, "vae": vae})()
    assert ZImageFamily().image_size(unset) == (1024, 1024)


def test_resolution_shift_is_diffusers_calculate_shift_to_the_last_bit():
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    from b2trl.models.base import resolution_shift

    custom = dict(base_image_seq_len=4, max_image_seq_len=64, base_shift=0.3, max_shift=1.3)
    for tokens in range(1, 5000):
        assert resolution_shift({}, tokens) == calculate_shift(tokens)
        assert resolution_shift(custom, tokens) == calculate_shift(tokens, 4, 64, 0.3, 1.3)


@pytest.mark.parametrize("resolution", [16, 32])
def test_schedule_kwargs_are_what_the_pipeline_passes_to_set_timesteps(zimage_dir, resolution):
    pipeline = _load(zimage_dir)
    # a resolution-dependent shift (base config values small enough for tiny images), and Turbo's fixed shift
    dynamic = dict(pipeline.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    for config in (dynamic, dict(pipeline.scheduler.config)):
        reference = _reference(zimage_dir, config)
        passed = []
        original = reference.scheduler.set_timesteps

        @functools.wraps(original)
        def record(*args, **kwargs):
            passed.append(kwargs)
            return original(*args, **kwargs)

        reference.scheduler.set_timesteps = record
        latents = torch.randn(2, 16, resolution // 2, resolution // 2, generator=torch.Generator().manual_seed(0))
        images = _pipeline_images(reference, num_inference_steps=5, guidance_scale=4.0, latents=latents,
                                  height=resolution, width=resolution)
        (kwargs,) = passed
        pipeline.sd_pipeline.scheduler = type(pipeline.scheduler).from_config(config)
        ours = pipeline.family.schedule_kwargs(pipeline.sd_pipeline, 5, (resolution, resolution))
        assert {k: v for k, v in kwargs.items() if k != "device"} == ours  # the same sigmas list and mu, exactly
        if config is dynamic:
            mu = ours["mu"]

        out = branch_rollout(pipeline, _guided(pipeline), sampler=FlowSDESampler(0.0), num_inference_steps=5,
                             branch_point=2, num_branches=2, guidance_scale=4.0, latents=latents,
                             image_size=(resolution, resolution))
        torch.testing.assert_close(pipeline.scheduler.sigmas, reference.scheduler.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(out.images, images.repeat_interleave(2, dim=0), rtol=0, atol=0)
    # mu moves the dynamic schedule with the image's size: 16 px has 16 tokens, 32 px has 64
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * ((resolution // 4) ** 2 - 4) / 60)


# ---------------------------------------------------------------------- the branch rollout


def test_rollout_at_noise_level_0_reproduces_the_pipeline_with_and_without_guidance(zimage_dir):
    pipeline = _load(zimage_dir)
    reference = _reference(zimage_dir)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def keep(pipe, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return tensors

    images = _pipeline_images(reference, num_inference_steps=6, guidance_scale=4.0, latents=latents,
                              height=16, width=16, callback_on_step_end=keep)
    assert images.shape == (2, 3, 16, 16) and 0.05 < images.std()
    conditioning = _guided(pipeline)
    out = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.0), num_inference_steps=6, branch_point=2,
                         num_branches=3, guidance_scale=4.0, latents=latents)
    torch.testing.assert_close(out.images, images.repeat_interleave(3, dim=0), rtol=0, atol=0)
    torch.testing.assert_close(out.branch_latents, seen[1], rtol=0, atol=0)
    # with the SDE in the interval the prefix is still the ODE, and the branches differ after it
    sde = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.7), num_inference_steps=6, branch_point=2,
                         num_branches=3, guidance_scale=4.0, latents=latents)
    torch.testing.assert_close(sde.branch_latents, seen[1], rtol=0, atol=0)
    assert (sde.images[0] - sde.images[1]).abs().max() > 0

    # Turbo's way: guidance_scale 0, one row per sample and no negative prompt. Four prompts, so that every
    # call has a multiple of 4 rows as above (on a CPU the per-sample modulation layers' matmuls round a batch of
    # 2 rows differently from one of 4, which would differ in the last bit from the pipeline's batch of 2)
    latents = torch.cat([latents, torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))])
    turbo = _pipeline_images(reference, PROMPTS * 2, num_inference_steps=4, guidance_scale=0.0, latents=latents,
                             height=16, width=16)
    with torch.no_grad():
        cond = pipeline.family.encode_prompts(pipeline.sd_pipeline, list(PROMPTS * 2), "cpu")
    out = branch_rollout(pipeline, Conditioning(cond), sampler=FlowSDESampler(0.0), num_inference_steps=4,
                         branch_point=1, num_branches=2, latents=latents)
    torch.testing.assert_close(out.images, turbo.repeat_interleave(2, dim=0), rtol=0, atol=0)


def test_cfg_normalization_and_truncation_are_the_pipelines(zimage_dir):
    family = ZImageFamily(cfg_normalization=1.0, cfg_truncation=0.5)
    pipeline = _load(zimage_dir, family)
    reference = _reference(zimage_dir)
    # four prompts: the unguided steps' calls have a multiple of 4 rows too (see the test above)
    prompts = PROMPTS * 2
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    options = dict(num_inference_steps=6, guidance_scale=4.0, latents=latents, height=16, width=16)
    images = _pipeline_images(reference, prompts, cfg_normalization=1.0, cfg_truncation=0.5, **options)
    calls = []
    handle = _transformer_calls(pipeline.transformer, calls)
    try:
        out = branch_rollout(pipeline, _guided(pipeline, prompts), sampler=FlowSDESampler(0.0),
                             num_inference_steps=6, branch_point=2, num_branches=2, guidance_scale=4.0,
                             latents=latents)
    finally:
        handle.remove()
    torch.testing.assert_close(out.images, images.repeat_interleave(2, dim=0), rtol=0, atol=0)
    # steps past the truncation run the conditional half alone, as the pipeline does
    schedule = pipeline.scheduler.timesteps
    guided = ((1000 - schedule) / 1000 <= 0.5).tolist()
    assert 0 < sum(guided) < 6
    assert [rows for rows, _, _ in calls] == [(4 * 2 if g else 4) for g in guided[:2]] + \
        [(4 * 2 * 2 if g else 4 * 2) for g in guided[2:]]
    # each option changes the images (so the comparison above checks both)
    for kwargs in (dict(cfg_truncation=0.5), dict(cfg_normalization=1.0)):
        assert (_pipeline_images(reference, prompts, **kwargs, **options) - images).abs().max() > 1e-4

    # a training batch mixing steps on both sides of the truncation: row by row what a one-row call gives (to
    # rounding: single-row calls take other matmul kernels, and guidance multiplies the difference by 5)
    conditioning = _guided(pipeline).repeat_interleave(3)
    rows_t = schedule[torch.tensor([0, 5, 1, 4, 2, 3])]
    x = torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = family.predict(pipeline.transformer, x, rows_t, conditioning, 4.0)
        for j in range(6):
            one = family.predict(pipeline.transformer, x[j : j + 1], rows_t[j : j + 1], conditioning.index([j]), 4.0)
            torch.testing.assert_close(mixed[j : j + 1], one, rtol=0, atol=1e-5)


def test_rollout_has_the_b2_shape_and_the_transformer_gets_zimage_time(zimage_dir):
    for guidance, halves in ((5.0, 2), (0.0, 1)):
        trainer = make_trainer(zimage_dir, sample_num_steps=5, sample_num_batches_per_epoch=1,
                               sample_guidance_scale=guidance)
        assert trainer.image_size == (16, 16)  # the VAE's sample_size
        assert (trainer.negative_conditioning is None) == (halves == 1)
        calls = []
        handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
        try:
            samples, batches = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
        finally:
            handle.remove()
        # prefix: 2 prompts (x CFG); interval: 2 prompts x 3 branches (x CFG)
        assert [rows for rows, _, _ in calls] == [2 * halves] * 2 + [2 * 3 * halves] * 3
        schedule = trainer.sd_pipeline.scheduler.timesteps
        # the transformer's time is (1000 - t) / 1000: 0 at pure noise
        assert [float(t[0]) for _, t, _ in calls] == ((1000 - schedule) / 1000).tolist()
        assert not any(grad for *_, grad in calls)
        sample = samples[0]
        assert sample["latents"].shape == (6, 3, 16, 8, 8) and batches[0].images.shape == (6, 3, 16, 16)
        assert torch.equal(sample["timesteps"][0], schedule[2:])
        assert sample["cond.prompt_embeds"].shape == (6, 512, 32) and sample["cond.prompt_length"].shape == (6,)
        assert ("uncond.prompt_embeds" in sample) == (halves == 2)
        assert torch.isfinite(sample["log_probs"]).all()


@pytest.mark.parametrize("guidance", [5.0, 0.0])
def test_recomputed_log_probs_equal_the_recorded_ones_in_other_batch_sizes(zimage_dir, guidance):
    trainer = make_trainer(zimage_dir, sample_guidance_scale=guidance)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=3)
    sample = samples[0]  # sampled as one batch of 6 rows per step, captions of three lengths
    with torch.no_grad():
        for rows in (slice(0, 4), slice(4, 6), slice(1, 2)):
            part = {k: v[rows] for k, v in sample.items()}
            # every interval step of these rows in one call, as training stacks them. (On a CPU, a call of a single
            # row takes another matmul kernel than a batch for the per-sample modulation layers, and differs in
            # the last bit; the stacked steps keep every call above that.)
            flat = batching.stack_steps(part, slice(0, 3))
            recomputed = trainer.transition_log_prob(
                flat["latents"], flat["timesteps"], flat["next_latents"], Conditioning.from_rows(flat)
            )
            assert torch.equal(recomputed, flat["log_probs"])  # the importance ratio is exactly 1
        # the stored rows shuffle like any others: a permutation of the rows permutes the recomputed values
        perm = torch.tensor([5, 0, 3, 1, 4, 2])
        shuffled = batching.stack_steps({k: v[perm] for k, v in sample.items()}, slice(0, 3))
        recomputed = trainer.transition_log_prob(shuffled["latents"], shuffled["timesteps"],
                                                 shuffled["next_latents"], Conditioning.from_rows(shuffled))
        assert torch.equal(recomputed, shuffled["log_probs"])


# ---------------------------------------------------------------------- training and weights


def test_training_touches_only_the_interval_and_the_lora_round_trips_through_diffusers(zimage_dir, tmp_path,
                                                                                       monkeypatch):
    from diffusers import ZImagePipeline
    from huggingface_hub import HfApi, ModelCard

    from b2trl import B2DiffuRLTrainer, load_pipeline

    config = small_config(train_learning_rate=1e-2, selection_rule="all", num_epochs=2)
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), load_pipeline(zimage_dir))
    before = _lora(trainer.sd_pipeline)
    assert {n.split(".lora_")[0].split(".", 2)[-1] for n in before} == set(ZImageFamily.lora_target_modules)
    trainer.train(epochs=1)
    calls = []
    handle = _transformer_calls(trainer.sd_pipeline.transformer, calls)
    try:
        trainer.train(epochs=2)  # stage 1
    finally:
        handle.remove()
    stats = trainer.last_stage_stats
    assert stats["stage"] == 1 and stats["samples_kept"] == 12 and stats["optimizer_steps"] > 0
    interval = (1000 - trainer.sd_pipeline.scheduler.timesteps[stats["branch_point"]:]) / 1000
    trained = [t for _, t, grad in calls if grad]
    assert trained and {float(x) for t in trained for x in t} == set(interval.tolist())  # the interval, no more
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0

    out = str(tmp_path / "lora")
    trainer.save_pretrained(out)
    state = ZImagePipeline.lora_state_dict(out)
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "ZImagePipeline" in card and "- z-image" in card and "guidance_scale=5.0" in card

    # diffusers' own loader gives the trained model's images
    loaded = _reference(zimage_dir)
    loaded.load_lora_weights(out)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    images = _pipeline_images(loaded, num_inference_steps=6, guidance_scale=5.0, latents=latents,
                              height=16, width=16)
    plain = _pipeline_images(_reference(zimage_dir), num_inference_steps=6, guidance_scale=5.0, latents=latents,
                             height=16, width=16)
    ours = branch_rollout(trainer.sd_pipeline, _guided(trainer.sd_pipeline), sampler=FlowSDESampler(0.0),
                          num_inference_steps=6, branch_point=5, num_branches=1, guidance_scale=5.0, latents=latents)
    torch.testing.assert_close(images, ours.images, rtol=0, atol=0)
    assert (plain - ours.images).abs().max() > 1e-3  # the comparison can tell the trained LoRA from none

    # Z-Image's image-to-image pipeline (which shares the LoRA loader and the transformer) takes it too
    from diffusers import ZImageImg2ImgPipeline

    img2img = ZImageImg2ImgPipeline.from_pretrained(zimage_dir)
    img2img.load_lora_weights(out)
    t = trainer.sd_pipeline.scheduler.timesteps[3].expand(2)
    cond = trainer.encode(["a cat", "a dog"]).cond
    with torch.no_grad():
        torch.testing.assert_close(trainer.family.forward(img2img.transformer, latents, t, cond),
                                   trainer.family.forward(trainer.sd_pipeline.transformer, latents, t, cond),
                                   rtol=0, atol=0)

    # a new run continues from it: the weights go into its own adapter
    resumed = make_trainer(zimage_dir)
    resumed.load_lora_weights(out)
    assert max_change(_lora(trainer.sd_pipeline), _lora(resumed.sd_pipeline)) == 0

    # and the push uploads the same files with the card (offline)
    uploads = {}

    class RepoUrl(str):
        repo_id = "me/zimage-b2"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        import os

        uploads["files"] = sorted(os.listdir(folder_path))
        uploads["card"] = ModelCard.load(os.path.join(folder_path, "README.md"))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert trainer.push_to_hub("me/zimage-b2") == "https://huggingface.co/me/zimage-b2"
    assert uploads["files"] == ["README.md", "pytorch_lora_weights.safetensors"]
    assert 'ZImagePipeline.from_pretrained' in uploads["card"].text
    assert "z-image" in uploads["card"].data.tags


def test_turbo_trains_without_guidance_and_its_card_samples_without_it(zimage_dir, monkeypatch):
    from diffusers import ZImagePipeline

    from b2trl.hub import build_model_card, sample_for_card

    trainer = make_trainer(zimage_dir, sample_guidance_scale=0.0, selection_rule="all", train_learning_rate=1e-2,
                           num_epochs=1)
    trainer.sd_pipeline.family = ZImageFamily(cfg_truncation=0.9)  # an option the card must carry
    trainer.family = trainer.sd_pipeline.family
    before = _lora(trainer.sd_pipeline)
    trainer.train()
    assert max_change(before, _lora(trainer.sd_pipeline)) > 0

    seen = []
    original = ZImagePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ZImagePipeline, "__call__", spy)
    images = sample_for_card(trainer.sd_pipeline, ["a cat"], [0], trainer.config)
    assert images.shape == (1, 1, 3, 16, 16)  # at the training resolution, not the pipeline's 1024
    (kwargs,) = seen
    assert kwargs["guidance_scale"] == 0.0 and kwargs.get("negative_prompt") is None and kwargs["cfg_truncation"] == 0.9
    card = build_model_card(trainer).text
    assert "guidance_scale=0.0, cfg_truncation=0.9" in card


def test_full_fine_tuning_saves_a_pipeline_diffusers_loads(zimage_dir, tmp_path):
    from diffusers import ZImagePipeline

    trainer = make_trainer(zimage_dir, use_lora=False, selection_rule="all", train_learning_rate=1e-3, num_epochs=1)
    before = {n: p.detach().clone() for n, p in trainer.sd_pipeline.transformer.named_parameters()}
    trainer.train()
    after = {n: p.detach() for n, p in trainer.sd_pipeline.transformer.named_parameters()}
    assert max_change(before, after) > 0
    trainer.save_pretrained(str(tmp_path / "full"))
    reloaded = ZImagePipeline.from_pretrained(str(tmp_path / "full"))
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = trainer.sd_pipeline.scheduler.timesteps[2].expand(2)
    cond = trainer.encode(["a cat", "a dog"]).cond
    with torch.no_grad():
        ours = trainer.family.forward(trainer.sd_pipeline.transformer, latents, t, cond)
        theirs = trainer.family.forward(reloaded.transformer, latents, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_two_processes_end_with_identical_weights(zimage_dir, tmp_path):
    stages = torchrun_tiny(zimage_dir, tmp_path, "--epochs", "2", timeout=240)
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["max_weight_diff_across_ranks"] == 0.0 for s in stages)
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"]


# ---------------------------------------------------------------------- the real shape


def test_the_zimage_shaped_builder_has_its_published_sizes_and_runs_at_narrow_width():
    from b2trl.models import wrap_pipeline
    from b2trl.testing import build_zimage_pipeline

    with torch.device("meta"):  # the architecture without allocating 10 B parameters
        real = build_zimage_pipeline()

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(real.transformer) == 6_154_908_736  # the "6 B" of Z-Image
    assert count(real.text_encoder) == 4_022_468_096  # Qwen3-4B without its (tied) LM head
    assert count(real.vae) == 83_819_683 and real.vae_scale_factor == 8
    config = real.transformer.config
    assert (config.dim, config.n_layers, config.n_refiner_layers, config.n_heads) == (3840, 30, 2, 30)
    assert config.cap_feat_dim == real.text_encoder.config.hidden_size == 2560

    pipeline = wrap_pipeline(build_zimage_pipeline(resolution=64, tiny_width=True))
    family, pipe = pipeline.family, pipeline.sd_pipeline
    assert isinstance(family, ZImageFamily) and family.image_size(pipe) == (64, 64)
    with torch.no_grad():
        conditioning = Conditioning(family.encode_prompts(pipe, ["a cat"], "cpu"),
                                    family.encode_negative(pipe, "", "cpu", (64, 64)))
    out = branch_rollout(pipeline, conditioning, sampler=FlowSDESampler(0.7), num_inference_steps=2,
                         branch_point=1, num_branches=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 64, 64) and torch.isfinite(out.log_probs).all()
    assert math.isfinite(float(out.images.mean()))
