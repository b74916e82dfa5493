import pytest
import torch

from b2trl.models import Conditioning
from b2trl.rollout import branch_rollout
from helpers import make_trainer


def test_branches_share_a_bit_identical_branch_point_and_differ_after(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    conditioning = trainer.encode(["a cat", "a dog"])
    torch.manual_seed(0)
    out = branch_rollout(
        trainer.sd_pipeline, conditioning, sampler=trainer.sampler, num_inference_steps=6, branch_point=2,
        num_branches=3,
    )
    assert out.latents.shape[:2] == (6, 4) and out.log_probs.shape == (6, 4) and out.images.shape[0] == 6
    for group in range(2):
        rows = out.latents[group * 3 : group * 3 + 3]
        for branch in rows:
            assert torch.equal(branch[0], out.branch_latents[group])  # bit-identical copies
        for t in range(1, 4):  # every later latent differs between branches (independent noise)
            assert not torch.equal(rows[0, t], rows[1, t]) and not torch.equal(rows[1, t], rows[2, t])
    assert not torch.equal(out.branch_latents[0], out.branch_latents[1])
    # transitions chain: the next latent of step t is the latent of step t+1
    assert torch.equal(out.next_latents[:, :-1], out.latents[:, 1:])
    expected_t = trainer.sd_pipeline.scheduler.timesteps[2:]
    assert (out.timesteps == expected_t).all()
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_chunking_bounds_the_unet_batch_and_keeps_the_prefix(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    conditioning = trainer.encode(["a cat", "a dog", "a red circle"])
    seen = []
    handle = trainer.sd_pipeline.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        noise = torch.randn(3, 4, 8, 8)
        kwargs = dict(num_inference_steps=5, branch_point=3, num_branches=4, latents=noise)
        torch.manual_seed(1)
        chunked = branch_rollout(trainer.sd_pipeline, conditioning, sampler=trainer.sampler, chunk_size=5, **kwargs)
        chunked_max = max(seen)
        seen.clear()
        torch.manual_seed(1)
        whole = branch_rollout(trainer.sd_pipeline, conditioning, sampler=trainer.sampler, **kwargs)
    finally:
        handle.remove()
    assert chunked_max <= 2 * 5  # CFG doubles the rows of each call
    assert max(seen) == 2 * 12
    assert chunked.latents.shape == whole.latents.shape == (12, 2, 4, 8, 8)
    # the prefix is the same computation either way (first chunk of 3 prompts fits in 5 rows)
    torch.testing.assert_close(chunked.branch_latents, whole.branch_latents, rtol=1e-5, atol=1e-5)


def test_recomputed_log_probs_equal_the_recorded_ones_at_step_zero(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=2)
    sample = samples[0]
    with torch.no_grad():
        for j in range(sample["timesteps"].shape[1]):
            recomputed = trainer.transition_log_prob(
                sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j],
                Conditioning.from_rows(sample),
            )
            ratio = torch.exp(recomputed - sample["log_probs"][:, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
            # and the PPO loss sees ratio 1: nothing clipped
            _, approx_kl, clipfrac = trainer.calculate_loss(
                sample["latents"][:, j],
                sample["timesteps"][:, j],
                sample["next_latents"][:, j],
                sample["log_probs"][:, j],
                torch.ones(sample["latents"].shape[0]),
                Conditioning.from_rows(sample),
            )
            assert float(approx_kl) < 1e-10 and float(clipfrac) == 0.0


def test_one_fused_unet_call_per_step_covers_every_branch(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    conditioning = trainer.encode(["a cat", "a dog"])
    calls = []
    handle = trainer.sd_pipeline.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        branch_rollout(
            trainer.sd_pipeline, conditioning, sampler=trainer.sampler, num_inference_steps=5, branch_point=2,
            num_branches=3,
        )
    finally:
        handle.remove()
    # prefix: one call per step over both prompts; interval: one call per step over all 6 branches; CFG doubles
    assert calls == [2 * 2] * 2 + [2 * 6] * 3


def test_compiled_unet_gives_the_same_log_probs_and_saves_the_same_lora(tiny_model_dir, tmp_path):
    from b2trl.accelerator import compile_unet
    from helpers import lora_params

    trainer = make_trainer(tiny_model_dir)
    pipeline, unet = trainer.sd_pipeline, trainer.sd_pipeline.unet
    conditioning = trainer.encode(["a cat", "a dog"])
    # branch point 0 keeps one UNet batch shape for sampling (dynamo compiles once per shape)
    kwargs = dict(
        num_inference_steps=3, branch_point=0, num_branches=2, latents=torch.randn(2, 4, 8, 8), sampler=trainer.sampler
    )
    eager = branch_rollout(pipeline, conditioning, generator=torch.Generator().manual_seed(0), **kwargs)
    names = list(unet.state_dict())

    # the "eager" backend runs dynamo's capture (what meets PEFT, hooks, no-grad and train mode) without
    # inductor's code generation, which takes minutes on a CPU; benchmarks/cost.py measures inductor itself
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert compile_unet(unet, backend="eager") is unet
    compiled = branch_rollout(pipeline, conditioning, generator=torch.Generator().manual_seed(0), **kwargs)
    assert counters["stats"]["unique_graphs"] > graphs  # the UNet really ran through dynamo
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.images, eager.images, rtol=0, atol=1e-5)
    # the training path (gradients, train mode) through the trainer's prepared UNet
    unet.train()
    embeds = conditioning.repeat_interleave(2)
    for j in range(3):
        transition = (eager.latents[:, j], eager.timesteps[:, j], eager.next_latents[:, j])
        log_prob = trainer.transition_log_prob(*transition, embeds)
        assert log_prob.requires_grad
        torch.testing.assert_close(log_prob.detach(), eager.log_probs[:, j], rtol=0, atol=1e-5)

    # compiled in place: same module, same parameter names, so unwrapping and LoRA saving/loading are unchanged
    assert trainer.accelerator.unwrap_model(trainer.training_unet) is unet
    assert list(unet.state_dict()) == names
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)
    trained = lora_params(pipeline)
    trainer.save_pretrained(str(tmp_path / "lora"))
    fresh = make_trainer(tiny_model_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = lora_params(fresh.sd_pipeline)
    assert loaded.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(loaded[name], trained[name])


def test_compile_settings_are_validated():
    from helpers import small_config

    config = small_config(compile_unet=True, compile_unet_kwargs={"mode": "max-autotune-no-cudagraphs"})
    assert config.compile_unet and config.train_timesteps_per_forward == 2  # the default
    with pytest.raises(ValueError, match="compile_unet_kwargs has unknown torch.compile arguments \\['speed'\\]"):
        small_config(compile_unet=True, compile_unet_kwargs={"speed": "max"})
    with pytest.raises(ValueError, match="train_timesteps_per_forward must be >= 1"):
        small_config(train_timesteps_per_forward=0)


def test_a_start_anchored_interval_records_the_first_steps_and_finishes_each_branch_unrecorded(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    conditioning = trainer.encode(["a cat", "a dog"])
    calls = []

    def record(module, args):
        calls.append((args[0].shape[0], float(args[1].reshape(-1)[0]), torch.is_grad_enabled()))

    handle = trainer.sd_pipeline.unet.register_forward_pre_hook(record)
    noise = torch.randn(2, 4, 8, 8)
    try:
        out = branch_rollout(
            trainer.sd_pipeline, conditioning, sampler=trainer.sampler, num_inference_steps=6, branch_point=0,
            interval_end=2, num_branches=3, latents=noise,
        )
    finally:
        handle.remove()
    schedule = trainer.sd_pipeline.scheduler.timesteps
    # no prefix; the interval and the suffix both run every branch (CFG doubles the rows); nothing with gradients
    assert [rows for rows, _, _ in calls] == [2 * 6] * 6
    assert [t for _, t, _ in calls] == schedule.tolist() and not any(grad for *_, grad in calls)
    # only the interval is recorded, and the branches fork at the initial noise
    assert out.latents.shape[:2] == (6, 2) and out.log_probs.shape == (6, 2) and torch.isfinite(out.log_probs).all()
    assert (out.timesteps == schedule[:2]).all()
    assert torch.equal(out.branch_latents, noise) and torch.equal(out.latents[:, 0], noise.repeat_interleave(3, 0))
    assert torch.equal(out.next_latents[:, :-1], out.latents[:, 1:])
    assert not torch.equal(out.images[0], out.images[1])  # each branch finished with its own noise

    # the recorded transitions are on-policy: their recomputed log-probabilities give ratio 1 (the transitions
    # hold the prompts' conditioning; the negative half is the trainer's one row)
    rows = out.transitions(conditioning)
    assert not any(k.startswith("uncond.") for k in rows)
    with torch.no_grad():
        for j in range(2):
            recomputed = trainer.transition_log_prob(
                rows["latents"][:, j], rows["timesteps"][:, j], rows["next_latents"][:, j],
                Conditioning.from_rows(rows, trainer.negative_conditioning),
            )
            torch.testing.assert_close(recomputed, rows["log_probs"][:, j], rtol=0, atol=1e-5)


@pytest.mark.parametrize("first, end", [(2, 2), (2, 7), (3, 1)])
def test_an_interval_end_outside_the_trajectory_is_named(tiny_model_dir, first, end):
    trainer = make_trainer(tiny_model_dir)
    with pytest.raises(ValueError, match="interval_end"):
        branch_rollout(
            trainer.sd_pipeline, trainer.encode(["a cat"]), sampler=trainer.sampler, num_inference_steps=6,
            branch_point=first, interval_end=end, num_branches=2,
        )
