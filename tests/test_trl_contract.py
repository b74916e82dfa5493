"""
TRL's own DDPOTrainer tests, run against `B2DiffuRLTrainer`, and the contract they rest on.

The first three tests are TRL 0.23.1's ``tests/test_ddpo_trainer.py``, each run twice as TRL runs it: full
fine-tuning (``DDPOTrainerTester``) and LoRA (``DDPOTrainerWithLoRATester``, which inherits the same three tests).
They keep TRL's configuration, scorer, prompt function and pipeline class (`DefaultDDPOStableDiffusionPipeline`),
adapted only where TRL's test cannot run here or where B²'s branches change a count:

- the pipeline is the offline tiny one (``tiny_model_dir``) instead of the Hub's
  ``hf-internal-testing/tiny-stable-diffusion-torch``, so latents and embeddings have its sizes;
- each prompt is sampled ``num_branches`` times, so a sampling batch of 2 prompts holds ``2 * N`` images and rows;
- the run's folder is a temporary one.

The tests after them check what TRL's tests take for granted: the sample dicts' TRL keys hold TRL's values (as
views of b2trl's own tensors), TRL's embeddings tensor conditions `calculate_loss` exactly as a `Conditioning`
does, with and without guidance, and a tensor is refused, with the fix named, where it cannot stand for the
conditioning.
"""

import pytest
import torch

from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer
from b2trl.models import Conditioning
from helpers import cycling_prompts, make_trainer

NUM_BRANCHES = 3
LATENT = (4, 8, 8)  # the tiny pipeline's latents (TRL's Hub model: 4 x 64 x 64)
EMBEDS = (16, 16)  # its tokenizer length and text width (TRL's Hub model: 77 x 32)


def scorer_function(images, prompts, metadata):
    return torch.randn(1) * 3.0, {}


def prompt_function():
    return ("cabbages", {})


def trl_config(logdir, **overrides) -> B2DiffuRLConfig:
    """TRL's test configuration, with B²'s branches and a temporary run folder."""
    values = dict(
        num_epochs=2,
        train_gradient_accumulation_steps=1,
        per_prompt_stat_tracking_buffer_size=32,
        sample_num_batches_per_epoch=2,
        sample_batch_size=2,
        mixed_precision=None,
        save_freq=1000000,
        num_branches=NUM_BRANCHES,
        logdir=str(logdir),
    )
    values.update(overrides)
    return B2DiffuRLConfig(**values)


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def trainer(request, tiny_model_dir, tmp_path_factory):
    from trl import DefaultDDPOStableDiffusionPipeline

    pipeline = DefaultDDPOStableDiffusionPipeline(tiny_model_dir, use_lora=request.param)
    config = trl_config(tmp_path_factory.mktemp("trl-contract"))
    return B2DiffuRLTrainer(config, scorer_function, prompt_function, pipeline)


# ----------------------------------------------------------------------------------------------- TRL's tests


def test_loss(trainer):
    """TRL's ``test_loss``: PPO-clip at ratio 1 with advantage -1 is exactly 1."""
    loss = trainer.loss(torch.tensor([-1.0]), 0.0001, torch.tensor([1.0]))
    assert loss.item() == 1.0


def test_generate_samples(trainer):
    """TRL's ``test_generate_samples``: one sampling batch gives one sample dict and one ``[images, prompts,
    metadata]`` entry, whose images are the batch's (2 prompts, here each sampled `num_branches` times)."""
    samples, output_pairs = trainer._generate_samples(1, 2)
    assert len(samples) == 1
    assert len(output_pairs) == 1
    assert len(output_pairs[0][0]) == 2 * NUM_BRANCHES


def test_calculate_loss(trainer):
    """
    TRL's ``test_calculate_loss``: one row of one step, taken from a sample dict under TRL's keys, gives a finite
    loss through TRL's signature with TRL's embeddings tensor. TRL's test passes its batch's ``prompt_embeds``
    (2 rows, which its guided UNet call reads as ``cat([negative, prompt])`` for the one row); with branches the
    batch has ``2 * N`` rows, so the tensor passed is the one TRL's training loop builds for that row:
    ``cat([negative_prompt_embeds, prompt_embeds])``.
    """
    samples, _ = trainer._generate_samples(1, 2)
    sample = samples[0]

    latents = sample["latents"][0, 0].unsqueeze(0)
    next_latents = sample["next_latents"][0, 0].unsqueeze(0)
    log_probs = sample["log_probs"][0, 0].unsqueeze(0)
    timesteps = sample["timesteps"][0, 0].unsqueeze(0)
    prompt_embeds = sample["prompt_embeds"]
    embeds = torch.cat([sample["negative_prompt_embeds"][:1], prompt_embeds[:1]])
    advantage = torch.tensor([1.0], device=prompt_embeds.device)

    assert latents.shape == (1, *LATENT)
    assert next_latents.shape == (1, *LATENT)
    assert log_probs.shape == (1,)
    assert timesteps.shape == (1,)
    assert prompt_embeds.shape == (2 * NUM_BRANCHES, *EMBEDS)
    assert embeds.shape == (2, *EMBEDS)
    loss, approx_kl, clipfrac = trainer.calculate_loss(latents, timesteps, next_latents, log_probs, advantage, embeds)
    assert torch.isfinite(loss.cpu())


# ----------------------------------------------------------------------------------------------- the contract


def _step(sample, j=0):
    """Step `j` of every row of a sample dict, as TRL's training loop slices it."""
    return (sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j], sample["log_probs"][:, j])


def test_trl_keys_hold_trls_values_as_views(tiny_model_dir, tmp_path):
    """``prompt_ids`` are TRL's tokenisation, one row per branch; ``prompt_embeds`` is the text encoder on them and
    the very tensor b2trl trains with; ``negative_prompt_embeds`` is the trainer's one negative row, expanded."""
    from trl import DefaultDDPOStableDiffusionPipeline

    pipeline = DefaultDDPOStableDiffusionPipeline(tiny_model_dir, use_lora=True)
    trainer = B2DiffuRLTrainer(trl_config(tmp_path), scorer_function, cycling_prompts(("a cat", "a red circle")),
                               pipeline)
    samples, pairs = trainer._generate_samples(2, 2)
    n, negative = NUM_BRANCHES, trainer.negative_conditioning["encoder_hidden_states"]
    for sample, (_, prompts, _) in zip(samples, pairs):
        ids = sample["prompt_ids"]
        assert ids.dtype == torch.long and ids.shape == (2 * n, EMBEDS[0])
        assert pipeline.tokenizer.batch_decode(ids, skip_special_tokens=True) == list(prompts)
        assert list(prompts) == [p for p in ("a cat", "a red circle") for _ in range(n)]
        with torch.no_grad():
            encoded = pipeline.text_encoder(ids[::n])[0]
        assert torch.equal(sample["prompt_embeds"], encoded.repeat_interleave(n, dim=0))
        assert sample["prompt_embeds"] is sample["cond.encoder_hidden_states"]
        neg = sample["negative_prompt_embeds"]
        assert neg.shape == (2 * n, *EMBEDS) and neg.stride(0) == 0 and neg.data_ptr() == negative.data_ptr()


def test_embeds_tensor_conditions_like_the_conditioning(trainer):
    """Every row of a step: ``cat([negative, prompt])`` and the prompt embeddings alone (the trainer's negative
    then added) give the loss, KL and clip fraction of the sample's `Conditioning`, bit for bit, and the loss
    is on-policy (the recorded log-probabilities are recomputed). Swapping the halves is not: the test can fail."""
    samples, _ = trainer._generate_samples(1, 2)
    sample = samples[0]
    latents, timesteps, next_latents, log_probs = _step(sample, j=1)
    advantages = torch.linspace(-1.0, 1.0, latents.shape[0], device=latents.device)
    prompt, negative = sample["prompt_embeds"], sample["negative_prompt_embeds"]

    def loss(embeds):
        with torch.no_grad():
            return trainer.calculate_loss(latents, timesteps, next_latents, log_probs, advantages, embeds)

    reference = loss(Conditioning.from_rows(sample))
    assert float(reference[1]) < 1e-10 and float(reference[2]) == 0.0  # on-policy
    for embeds in (torch.cat([negative, prompt]), prompt):
        out = loss(embeds)
        assert all(torch.equal(a, b) for a, b in zip(out, reference))
    swapped = loss(torch.cat([prompt, negative]))
    assert float(swapped[1]) > 1e-6


def test_without_guidance_the_tensor_is_the_prompt_embeddings(tiny_model_dir):
    """With ``train_cfg=False`` there is no negative half: TRL passes ``prompt_embeds`` alone, which recomputes
    the recorded log-probabilities; a tensor of twice the rows is refused with the reason."""
    trainer = make_trainer(tiny_model_dir, train_cfg=False)
    samples, _ = trainer._generate_samples(1, 2)
    sample = samples[0]
    assert "negative_prompt_embeds" not in sample and "prompt_ids" in sample
    latents, timesteps, next_latents, log_probs = _step(sample)
    advantages = torch.ones(latents.shape[0], device=latents.device)
    with torch.no_grad():
        _, approx_kl, clipfrac = trainer.calculate_loss(latents, timesteps, next_latents, log_probs, advantages,
                                                        sample["prompt_embeds"])
    assert float(approx_kl) < 1e-10 and float(clipfrac) == 0.0
    doubled = torch.cat([sample["prompt_embeds"]] * 2)
    with pytest.raises(ValueError, match=r"embeds has 12 rows for 6 rows of latents.*train_cfg is off"):
        trainer.calculate_loss(latents, timesteps, next_latents, log_probs, advantages, doubled)


def test_wrong_rows_and_types_are_refused(trainer):
    samples, _ = trainer._generate_samples(1, 2)
    sample = samples[0]
    latents, timesteps, next_latents, log_probs = _step(sample)
    advantages = torch.ones(latents.shape[0], device=latents.device)
    args = (latents, timesteps, next_latents, log_probs, advantages)
    with pytest.raises(ValueError, match=r"embeds has 5 rows for 6 rows of latents; expected 12 .* or 6"):
        trainer.calculate_loss(*args, sample["prompt_embeds"][:5])
    with pytest.raises(TypeError, match="embeds must be a Conditioning or TRL's prompt-embeddings tensor, got dict"):
        trainer.calculate_loss(*args, {"encoder_hidden_states": sample["prompt_embeds"]})


def test_a_tensor_cannot_condition_a_family_that_needs_more(tiny_sdxl_dir):
    """SDXL's UNet also takes pooled text embeddings and size ids: its samples carry no TRL keys, and a tensor
    passed as `embeds` is refused with the fix (a `Conditioning`), while the sample's own conditioning works."""
    trainer = make_trainer(tiny_sdxl_dir)
    samples, _ = trainer._generate_samples(1, 1)
    sample = samples[0]
    assert not {"prompt_ids", "prompt_embeds", "negative_prompt_embeds"} & set(sample)
    latents, timesteps, next_latents, log_probs = _step(sample)
    args = (latents, timesteps, next_latents, log_probs, torch.ones(latents.shape[0], device=latents.device))
    with pytest.raises(ValueError, match=r"sdxl family's unet takes more than encoder_hidden_states.*Conditioning"):
        trainer.calculate_loss(*args, sample["cond.encoder_hidden_states"])
    with torch.no_grad():
        _, approx_kl, _ = trainer.calculate_loss(*args, Conditioning.from_rows(sample))
    assert float(approx_kl) < 1e-10
