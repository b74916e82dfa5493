"""The shipped toy pipeline: loads offline with diffusers and TRL, takes a LoRA, and draws better than noise."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from b2trl.toy import alignment_reward, evaluate_alignment, model_path, save_grid, train_prompts
from b2trl.toy.evaluate import generate

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(model_path(), "model_index.json")), reason="toy model weights not present"
)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(model_path())
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_is_small_and_tokenizer_loads_offline():
    from transformers import CLIPTokenizer

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(model_path()) for f in fs)
    assert total <= 20 * 2**20
    folder = os.path.join(model_path(), "tokenizer")
    assert os.path.exists(os.path.join(folder, "vocab.json")) and os.path.exists(os.path.join(folder, "merges.txt"))
    tok = CLIPTokenizer.from_pretrained(folder)
    ids = tok("a red circle left of a blue square").input_ids
    assert tok.unk_token_id not in ids[1:-1] and len(ids) == 10


def test_architecture_builds_the_shipped_modules(pipe):
    from b2trl.toy.architecture import build_toy_components

    built = build_toy_components(pipe.tokenizer)
    for name, module in zip(("vae", "unet", "text_encoder"), built):
        shipped = {k: v.shape for k, v in getattr(pipe, name).state_dict().items()}
        assert {k: v.shape for k, v in module.state_dict().items()} == shipped, name
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert built[-1].config[key] == pipe.scheduler.config[key], key


def test_diffusers_pipeline_generates(pipe):
    assert pipe.tokenizer.model_max_length <= pipe.text_encoder.config.max_position_embeddings
    out = pipe(["a red circle", "a blue square above a green triangle"], num_inference_steps=4, output_type="pt")
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1


def test_trl_ddpo_pipeline_attaches_lora():
    from accelerate import PartialState
    from trl import DefaultDDPOStableDiffusionPipeline

    PartialState()
    ddpo = DefaultDDPOStableDiffusionPipeline(model_path(), use_lora=True)
    layers = ddpo.get_trainable_layers()
    lora = [n for n, p in ddpo.unet.named_parameters() if "lora" in n and p.requires_grad]
    assert lora and all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in lora)
    assert any(p.requires_grad for p in (layers.parameters() if hasattr(layers, "parameters") else layers))
    ddpo.sd_pipeline.set_progress_bar_config(disable=True)
    out = ddpo(
        prompt=["a red circle and a blue square"] * 2,
        num_inference_steps=3,
        guidance_scale=5.0,
        eta=1.0,
        output_type="pt",
    )
    assert out.images.shape == (2, 3, 32, 32) and len(out.log_probs) == 3


def test_model_draws_better_than_noise(pipe):
    prompts = train_prompts()[:48]
    images = generate(pipe, prompts, seeds=(0,))[0]
    model = alignment_reward(images, prompts)[0].mean().item()
    noise = alignment_reward(torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0)), prompts)[
        0
    ]
    assert model > noise.mean().item() + 0.3


def test_evaluation_is_deterministic_and_grid_saves(pipe, tmp_path):
    prompts = ["a red circle", "a yellow square right of a purple circle", "a cyan triangle and a green square"]
    a = evaluate_alignment(pipe, prompts=prompts, seeds=(0, 1), num_inference_steps=4, batch_size=3, return_images=True)
    b = evaluate_alignment(pipe, prompts=prompts, seeds=(0, 1), num_inference_steps=4, batch_size=2, return_images=True)
    assert a["images"].shape == (2, 3, 3, 32, 32)
    assert torch.allclose(a["images"], b["images"], atol=1e-3)
    assert set(a["per_template"]) == {"single", "binding", "relation"} and len(a["per_seed"]) == 2
    assert a["diversity"] > 0
    path = save_grid(a["images"], str(tmp_path / "grid.png"), nrow=2, labels=prompts)
    from PIL import Image

    img = Image.open(path)
    assert img.size[0] > 2 * 32 and img.size[1] >= 3 * 32


def test_lora_saved_by_trl_loads_into_evaluation(tmp_path):
    from accelerate import PartialState
    from trl import DefaultDDPOStableDiffusionPipeline

    PartialState()
    ddpo = DefaultDDPOStableDiffusionPipeline(model_path(), use_lora=True)
    ddpo.get_trainable_layers()
    with torch.no_grad():  # a visible change: LoRA B matrices start at zero
        for name, p in ddpo.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    ddpo.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "pytorch_lora_weights.safetensors")
    prompts = ["a red circle above a blue square"]
    base = evaluate_alignment(None, prompts=prompts, seeds=(0,), num_inference_steps=3, return_images=True)
    tuned = evaluate_alignment(
        None, lora_path=str(tmp_path), prompts=prompts, seeds=(0,), num_inference_steps=3, return_images=True
    )
    assert not torch.allclose(base["images"], tuned["images"], atol=1e-3)
