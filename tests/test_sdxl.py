"""Stable Diffusion XL as a model family, on a tiny random SDXL pipeline built from configs (offline)."""

import json
from pathlib import Path

import pytest
import torch

from b2trl.models import Conditioning, StableDiffusionXLFamily
from helpers import lora_params, make_trainer, max_change, torchrun_tiny


@pytest.fixture(scope="module")
def sdxl_dir(tiny_sdxl_dir):
    return tiny_sdxl_dir


def _unet_calls(unet, calls):
    """Record every UNet call: (rows, timesteps, added_cond_kwargs, whether gradients were on)."""

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.shape[0], timestep.detach().clone(), kwargs.get("added_cond_kwargs"),
                      torch.is_grad_enabled()))

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_load_pipeline_picks_sdxl_and_encodes_prompts_as_diffusers_does(sdxl_dir):
    from b2trl import load_pipeline

    pipeline = load_pipeline(sdxl_dir)
    pipe = pipeline.sd_pipeline
    assert isinstance(pipeline.family, StableDiffusionXLFamily)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and not pipe.scheduler.config.clip_sample  # was Euler
    assert not any(p.requires_grad for name in ("text_encoder", "text_encoder_2", "vae")
                   for p in getattr(pipe, name).parameters())

    family, size = pipeline.family, (16, 16)
    with torch.no_grad():
        cond = family.encode_prompts(pipe, ["a cat", "a dog"], "cpu", size)
        uncond = family.encode_negative(pipe, "", "cpu", size)
        blurry = family.encode_negative(pipe, "blurry", "cpu", size)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(["a cat", "a dog"], device="cpu")
        _, blurry_embeds, _, blurry_pooled = pipe.encode_prompt("a cat", device="cpu", negative_prompt="blurry")
    assert cond["encoder_hidden_states"].shape == (2, 16, 16 + 32)  # both encoders' widths side by side
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    # an empty negative prompt is zeros for this model (force_zeros_for_empty_prompt), as diffusers does
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative[:1], rtol=0, atol=0)
    torch.testing.assert_close(uncond["text_embeds"], negative_pooled[:1], rtol=0, atol=0)
    assert not uncond["text_embeds"].any()
    torch.testing.assert_close(blurry["encoder_hidden_states"], blurry_embeds, rtol=0, atol=0)
    torch.testing.assert_close(blurry["text_embeds"], blurry_pooled, rtol=0, atol=0)
    expected_ids = pipe._get_add_time_ids(size, (0, 0), size, torch.float32, pipe.text_encoder_2.config.projection_dim)
    for ids in (cond["time_ids"], uncond["time_ids"]):
        torch.testing.assert_close(ids, expected_ids.expand(ids.shape[0], -1), rtol=0, atol=0)


def test_rollout_has_the_b2_shape_and_every_call_gets_its_size_conditioning(sdxl_dir):
    # a non-default resolution: the latents and the time ids both follow it
    trainer = make_trainer(sdxl_dir, resolution=32, sample_num_steps=5, sample_num_batches_per_epoch=1)
    assert trainer.image_size == (32, 32)
    calls = []
    handle = _unet_calls(trainer.sd_pipeline.unet, calls)
    try:
        samples, batches = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    finally:
        handle.remove()
    # prefix: 2 prompts x CFG; interval: 2 prompts x 3 branches x CFG
    assert [rows for rows, *_ in calls] == [2 * 2] * 2 + [2 * 2 * 3] * 3
    for rows, _, added, grad in calls:
        assert not grad and added["text_embeds"].shape == (rows, 24)
        assert (added["time_ids"] == torch.tensor([32.0, 32, 0, 0, 32, 32])).all()
        # the unconditional half's pooled embedding is zeros, the prompts' is not
        assert not added["text_embeds"][: rows // 2].any() and added["text_embeds"][rows // 2 :].abs().sum() > 0
    sample = samples[0]
    assert sample["latents"].shape == (6, 3, 4, 16, 16) and batches[0].images.shape == (6, 3, 32, 32)
    assert {"cond.encoder_hidden_states", "cond.text_embeds", "cond.time_ids", "uncond.text_embeds"} <= set(sample)
    assert all(v.shape[0] == 6 for v in sample.values())


def test_recomputed_log_probs_equal_the_recorded_ones(sdxl_dir):
    trainer = make_trainer(sdxl_dir)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=3)
    sample = samples[0]
    conditioning = Conditioning.from_rows(sample)
    with torch.no_grad():
        for j in range(sample["timesteps"].shape[1]):
            transition = (sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j])
            recomputed = trainer.transition_log_prob(*transition, conditioning)
            ratio = torch.exp(recomputed - sample["log_probs"][:, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
            _, approx_kl, clipfrac = trainer.calculate_loss(
                *transition, sample["log_probs"][:, j], torch.ones(ratio.shape[0]), conditioning
            )
            assert float(approx_kl) < 1e-10 and float(clipfrac) == 0.0


def test_training_touches_only_the_interval_and_the_lora_round_trips_through_diffusers(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    trainer = make_trainer(sdxl_dir, train_learning_rate=1e-2, selection_rule="all")
    before = lora_params(trainer.sd_pipeline)
    calls = []
    handle = _unet_calls(trainer.sd_pipeline.unet, calls)
    try:
        trainer.train(epochs=1)
    finally:
        handle.remove()
    stats = trainer.last_stage_stats
    branch_point = stats["branch_point"]
    interval = {int(t) for t in trainer.sd_pipeline.scheduler.timesteps[branch_point:]}
    trained = [(rows, t, added) for rows, t, added, grad in calls if grad]
    assert trained and stats["samples_kept"] == 12 and stats["interval_length"] == 2
    assert {int(t) for _, ts, _ in trained for t in ts} == interval  # every interval step, and nothing else
    assert all(added["time_ids"].shape == (rows, 6) for rows, _, added in trained)
    assert max_change(before, lora_params(trainer.sd_pipeline)) > 0

    out = str(tmp_path / "lora")
    trainer.save_pretrained(out)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(out)
    assert state and all(k.startswith("unet.") for k in state)
    assert "StableDiffusionXLPipeline" in (tmp_path / "lora" / "README.md").read_text()
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    plain = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    base.load_lora_weights(out)

    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    conditioning = trainer.encode(["a cat", "a dog"])
    family = trainer.family
    with torch.no_grad():
        ours = family.forward(trainer.sd_pipeline.unet, latents, t, conditioning.cond)
        loaded = family.forward(base.unet, latents, t, conditioning.cond)
        untrained = family.forward(plain.unet, latents, t, conditioning.cond)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-5)
    assert (untrained - ours).abs().max() > 1e-4  # the comparison can tell a trained LoRA from none


def test_resume_restores_the_lora_into_its_adapter_and_keeps_training(sdxl_dir, tmp_path):
    def trainer(**overrides):
        return make_trainer(sdxl_dir, save_freq=1, project_kwargs={"project_dir": str(tmp_path)},
                            train_learning_rate=1e-2, selection_rule="all", **overrides)

    first = trainer(num_epochs=1)
    first.train()
    trained = lora_params(first.sd_pipeline)
    resumed = trainer(num_epochs=2, resume_from="latest")
    assert resumed.first_epoch == 1 and resumed.global_step == first.global_step
    assert max_change(trained, lora_params(resumed.sd_pipeline)) == 0
    assert list(resumed.sd_pipeline.unet.peft_config) == ["default"]
    resumed.train()
    assert resumed.last_stage_stats["stage"] == 1
    assert max_change(trained, lora_params(resumed.sd_pipeline)) > 0


def test_memory_options_run_checkpointing_chunks_and_a_separate_vae(sdxl_dir, tmp_path):
    from b2trl import B2DiffuRLTrainer, load_pipeline
    from b2trl.testing import build_tiny_sdxl_vae
    from helpers import brightness_reward, cycling_prompts, small_config

    vae_dir = str(tmp_path / "vae")
    separate = build_tiny_sdxl_vae(vae_dir, seed=7, force_upcast=False)
    pipeline = load_pipeline(sdxl_dir, pretrained_vae=vae_dir)
    assert not pipeline.vae.config.force_upcast
    torch.testing.assert_close(pipeline.vae.state_dict(), separate.state_dict(), rtol=0, atol=0)
    with pytest.raises(OSError, match="pretrained_vae"):
        load_pipeline(sdxl_dir, pretrained_vae=str(tmp_path / "missing"))

    config = small_config(gradient_checkpointing=True, rollout_chunk_size=4, selection_rule="all",
                          train_learning_rate=1e-2, num_epochs=1)
    trainer = B2DiffuRLTrainer(config, brightness_reward, cycling_prompts(), pipeline)
    unet = trainer.sd_pipeline.unet
    assert unet.is_gradient_checkpointing
    calls = []
    handle = _unet_calls(unet, calls)
    before = lora_params(trainer.sd_pipeline)
    try:
        trainer.train()
    finally:
        handle.remove()
    assert max(rows for rows, _, _, grad in calls if not grad) <= 2 * 4  # CFG doubles each chunk's rows
    assert max_change(before, lora_params(trainer.sd_pipeline)) > 0
    trainer.save_pretrained(str(tmp_path / "lora"))
    card = (tmp_path / "lora" / "README.md").read_text()
    # the card names the VAE by folder name (never this machine's path) and loads it in the snippet
    assert "| VAE | `vae` |" in card and 'AutoencoderKL.from_pretrained("vae")' in card and ", vae=vae)" in card
    assert "- stable-diffusion-xl" in card and str(tmp_path) not in card

    # checkpointing recomputes activations; the gradient is the same
    samples, _ = trainer._generate_samples(iterations=1, batch_size=1, branch_point=4)
    sample = {k: v[:2] for k, v in samples[0].items()}
    transition = (sample["latents"][:, 0], sample["timesteps"][:, 0], sample["next_latents"][:, 0])

    def gradient():
        unet.zero_grad()
        trainer.transition_log_prob(*transition, Conditioning.from_rows(sample)).sum().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    unet.train()
    checkpointed = gradient()
    unet.disable_gradient_checkpointing()
    plain = gradient()
    assert checkpointed.keys() == plain.keys() and checkpointed
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_the_vae_stays_in_fp32_in_an_fp16_run_when_it_asks_for_it(sdxl_dir, tmp_path):
    from diffusers import AutoencoderKL

    from b2trl import load_pipeline
    from b2trl.testing import build_tiny_sdxl_vae

    family = StableDiffusionXLFamily()
    pipe = load_pipeline(sdxl_dir).sd_pipeline
    weights = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    assert pipe.vae.config.force_upcast
    family.place(pipe, "cpu", torch.float16, use_lora=True)  # as the trainer places an fp16 run
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == pipe.text_encoder_2.dtype == torch.float16
    # moved straight to fp32, never rounded through fp16
    torch.testing.assert_close(pipe.vae.state_dict(), weights, rtol=0, atol=0)
    assert family.vae_dtype(pipe.vae, torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range: no overflow
    build_tiny_sdxl_vae(str(tmp_path / "vae"), force_upcast=False)
    fp16_safe = load_pipeline(sdxl_dir, pretrained_vae=str(tmp_path / "vae")).sd_pipeline
    family.place(fp16_safe, "cpu", torch.float16, use_lora=True)
    assert fp16_safe.vae.dtype == torch.float16

    # a VAE that someone else cast to fp16 is upcast at its first decode, and stays in fp32
    vae = AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae")
    holder = type("Pipe", (), {"vae": vae})()
    latents = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(0)).half()
    with torch.no_grad():
        fp32_images = family.decode(holder, latents)
        vae.to(torch.float16)
        images = family.decode(holder, latents)
    assert vae.dtype == torch.float32 and images.dtype == torch.float32
    torch.testing.assert_close(images, fp32_images, rtol=0, atol=2e-3)  # up to the weights' fp16 rounding


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process state is a singleton that fixes mixed precision once set: reset it before and after."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def test_a_bf16_run_trains_with_float32_size_ids(sdxl_dir, fresh_accelerate_state):
    trainer = make_trainer(sdxl_dir, mixed_precision="bf16", selection_rule="all", num_epochs=1,
                           train_learning_rate=1e-2)
    pipe = trainer.sd_pipeline
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder_2.dtype == torch.bfloat16  # bf16 does not overflow
    cond = trainer.encode(["a cat"]).cond
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16 and cond["time_ids"].dtype == torch.float32
    before = lora_params(pipe)
    trainer.train()
    assert max_change(before, lora_params(pipe)) > 0


def test_full_fine_tuning_with_8bit_adamw_writes_a_loadable_pipeline(sdxl_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="train_use_8bit_adam needs bitsandbytes")
    from diffusers import StableDiffusionXLPipeline

    trainer = make_trainer(sdxl_dir, use_lora=False, train_use_8bit_adam=True, selection_rule="all",
                           train_learning_rate=1e-3, num_epochs=1)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    unet = trainer.sd_pipeline.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer.train()
    assert max_change(before, {n: p.detach() for n, p in unet.named_parameters()}) > 0
    # tensors of 4096 elements or more keep 8-bit moments (their quantisation maps), smaller ones fp32
    states = optimizer.state.values()
    assert any("qmap1" in s for s in states) and any("qmap1" not in s for s in states)

    out = str(tmp_path / "full")
    trainer.save_pretrained(out)
    loaded = StableDiffusionXLPipeline.from_pretrained(out)
    for name, param in loaded.unet.state_dict().items():
        torch.testing.assert_close(param, unet.state_dict()[name], rtol=0, atol=0)
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_two_processes_end_with_identical_weights(sdxl_dir, tmp_path):
    stages = torchrun_tiny(sdxl_dir, tmp_path, "--epochs", "2", timeout=240)
    assert [s["stage"] for s in stages] == [0, 1]
    assert all(s["max_weight_diff_across_ranks"] == 0.0 for s in stages)
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"]


def test_the_sdxl_shaped_builder_has_sdxl_base_sizes_and_runs_at_tiny_width():
    from b2trl.models import wrap_pipeline
    from b2trl.rollout import branch_rollout
    from b2trl.samplers import DDIMSampler
    from b2trl.testing import build_sdxl_pipeline

    with torch.device("meta"):
        real = build_sdxl_pipeline()
    sizes = {name: sum(p.numel() for p in getattr(real, name).parameters())
             for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    # stabilityai/stable-diffusion-xl-base-1.0's parameter counts
    assert sizes == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                     "text_encoder_2": 694_659_840}

    pipeline = wrap_pipeline(build_sdxl_pipeline(resolution=64, tiny_width=True))
    assert isinstance(pipeline.family, StableDiffusionXLFamily)
    with torch.no_grad():
        cond = pipeline.family.encode_prompts(pipeline.sd_pipeline, ["a cat"], "cpu", (64, 64))
        uncond = pipeline.family.encode_negative(pipeline.sd_pipeline, "", "cpu", (64, 64))
    out = branch_rollout(pipeline, Conditioning(cond, uncond), sampler=DDIMSampler(1.0), num_inference_steps=2,
                         branch_point=1, num_branches=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 64, 64) and torch.isfinite(out.log_probs).all()


def test_the_train_command_trains_sdxl_and_writes_a_lora_diffusers_loads(sdxl_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from b2trl.cli import main

    monkeypatch.chdir(Path(__file__).parent)  # so that 'helpers:brightness_reward' imports
    out = tmp_path / "out"
    main(["train", "--pretrained_model", sdxl_dir, "--prompts", "a cat", "a dog", "--output_dir", str(out),
                   "--num_epochs", "1", "--sample_num_steps", "4", "--sample_batch_size", "2",
                   "--sample_num_batches_per_epoch", "1", "--num_branches", "2", "--initial_length", "2",
                   "--num_stages", "1", "--reward", "helpers:brightness_reward", "--no_branch_images"])
    assert [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(str(out / "lora"))
    assert "StableDiffusionXLPipeline" in (out / "lora" / "README.md").read_text()
