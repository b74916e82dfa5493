"""The shipped toy flow model (``b2trl.toy.model_path("sd3")``): loads with plain diffusers, carries its T5 length,
fits the size budget, matches the architecture builder, and draws held-out scenes far better than untrained."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from b2trl.toy import alignment_reward, heldout_prompts, model_path

FOLDER = model_path("sd3")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(FOLDER, "model_index.json")), reason="toy flow model weights not present"
)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(FOLDER)
    p.set_progress_bar_config(disable=True)
    return p


def test_model_path_kinds():
    assert model_path() == model_path("sd") and os.path.basename(model_path()) == "model"
    assert os.path.basename(FOLDER) == "model_sd3"
    with pytest.raises(ValueError, match="sdxl"):
        model_path("sdxl")


def test_folder_is_small_fp32_and_carries_its_t5_length(pipe):
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FOLDER) for f in fs)
    assert total <= 15 * 10**6
    assert os.path.exists(os.path.join(FOLDER, "README.md"))
    assert pipe.tokenizer_3.model_max_length == 16
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert all(p.dtype == torch.float32 for p in getattr(pipe, name).parameters()), name
    # the T5 tokenizer keeps every prompt word whole and ends with </s>, within the 16 positions
    ids = pipe.tokenizer_3("a red circle left of a blue square").input_ids
    assert ids[-1] == pipe.tokenizer_3.eos_token_id and len(ids) == 9 and pipe.tokenizer_3.unk_token_id not in ids
    # SD3 decodes latents / scaling_factor + shift_factor: the reused SD toy VAE needs both
    assert pipe.vae.config.shift_factor is not None and pipe.scheduler.config.shift == 3.0


def test_builder_matches_shipped_weights(pipe):
    from b2trl.toy.architecture import build_toy_sd3_components

    built = build_toy_sd3_components(pipe.tokenizer, pipe.tokenizer_3, latent_channels=pipe.vae.config.latent_channels)
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    for name, module in zip(names, built):
        shipped = {k: v.shape for k, v in getattr(pipe, name).state_dict().items()}
        assert {k: v.shape for k, v in module.state_dict().items()} == shipped, name
    assert built[-1].config.shift == pipe.scheduler.config.shift


def test_training_conditioning_equals_pipeline_encoding(pipe):
    from b2trl.toy.pretrain import tokenize
    from b2trl.toy.pretrain_flow import encode_text

    prompts = ["a red circle left of a blue square", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=16
    )
    clip_ids, t5_ids = tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_3, prompts)
    with torch.no_grad():
        ours, ours_pooled = encode_text(
            pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, clip_ids, clip_ids, t5_ids
        )
    torch.testing.assert_close(ours, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_pooled, pooled, atol=1e-5, rtol=1e-5)


def test_heldout_samples_are_aligned(pipe):
    from b2trl.toy import generate

    prompts = heldout_prompts()[::3]  # 15 prompts: 1 single, 5 binding, 9 relation
    images = generate(pipe, prompts, seeds=(0,), num_inference_steps=20, guidance_scale=5.0)[0]  # T5 at 16
    assert images.shape == (len(prompts), 3, 32, 32)
    score = alignment_reward(images, prompts)[0].mean().item()
    # the shipped model scores 0.877 here (0.847-0.877 over seeds 0-2); an untrained one of this architecture 0.13
    assert score > 0.7, score
