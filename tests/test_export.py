import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import HfApi, ModelCard

from helpers import make_trainer


def _unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), embeds).sample


def test_saved_lora_loads_in_plain_diffusers_and_reproduces_the_trained_unet(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, train_learning_rate=1e-2)
    trainer.train(epochs=1)
    trained = _unet_output(trainer.sd_pipeline.unet)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    untouched = _unet_output(base.unet)
    assert not torch.allclose(trained, untouched, atol=1e-6)  # training moved the weights

    trainer.save_pretrained(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    base.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_unet_output(base.unet), trained, rtol=1e-5, atol=1e-5)


def test_full_fine_tune_saves_a_loadable_pipeline(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, use_lora=False, train_learning_rate=1e-3)
    trainer.train(epochs=1)
    trainer.save_pretrained(str(tmp_path / "full"))
    reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    torch.testing.assert_close(_unet_output(reloaded.unet), _unet_output(trainer.sd_pipeline.unet))


def test_model_card_describes_the_run(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir)
    trainer.train(epochs=2)
    trainer.save_pretrained(
        str(tmp_path / "lora"), base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", reward_name="brightness"
    )
    card = ModelCard.load(str(tmp_path / "lora" / "README.md"))
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"lora", "b2-diffurl", "text-to-image", "trl"} <= set(card.data.tags)
    text = card.text
    assert "| reward | `brightness` |" in text and "| stages trained | 2 |" in text
    assert f"{trainer.last_stage_stats['reward_mean']:.4f}" in text
    assert "initial_length=2, num_stages=4" in text
    assert "load_lora_weights(" in text and "2503.11240" in text


def test_push_to_hub_uploads_weights_and_card(tiny_model_dir, monkeypatch):
    calls = {}

    class RepoUrl(str):
        repo_id = "me/b2-toy"

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return RepoUrl("https://huggingface.co/me/b2-toy")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        import os

        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)))
        calls["card"] = ModelCard.load(os.path.join(folder_path, "README.md"))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    trainer = make_trainer(tiny_model_dir)
    trainer.train(epochs=1)
    url = trainer.push_to_hub("me/b2-toy", private=True)
    assert url == "https://huggingface.co/me/b2-toy"
    assert calls["create"][0] == "me/b2-toy" and calls["create"][1]["private"] is True
    assert calls["upload"] == ("me/b2-toy", ["README.md", "pytorch_lora_weights.safetensors"])
    assert 'load_lora_weights("me/b2-toy")' in calls["card"].text
    assert tiny_model_dir not in calls["card"].text  # no local paths leak into a public card


def test_model_card_shows_samples_evaluation_and_the_family_pipeline(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from b2trl.hub import build_model_card, save_samples

    trainer = make_trainer(tiny_model_dir)
    folder = str(tmp_path / "lora")
    images = {"base": torch.rand(2, 1, 3, 8, 8), "trained": torch.rand(2, 1, 3, 8, 8)}
    samples = save_samples(folder, ["a cat"], [0, 1], images)
    assert [s["path"] for s in samples] == [
        "samples/base_0_seed0.png", "samples/base_0_seed1.png", "samples/trained_0_seed0.png",
        "samples/trained_0_seed1.png",
    ]
    from PIL import Image

    assert Image.open(tmp_path / "lora" / samples[0]["path"]).size == (128, 128)  # enlarged to be seen
    with pytest.raises(ValueError, match=r"expected \(2, 2, 3, H, W\)"):
        save_samples(folder, ["a cat", "a dog"], [0, 1], images)

    evaluation = {"held-out alignment": {"base": 0.865, "trained": 0.896}}
    card = build_model_card(trainer, samples=samples, evaluation=evaluation)
    text = card.text
    assert "| prompt | base · seed 0 | base · seed 1 | trained · seed 0 | trained · seed 1 |" in text
    assert "| a cat | ![base, seed 0](samples/base_0_seed0.png) |" in text
    assert "| held-out alignment | 0.865 | 0.896 | +0.031 |" in text
    assert card.data.widget == [
        {"text": "a cat", "output": {"url": "samples/trained_0_seed0.png"}},
        {"text": "a cat", "output": {"url": "samples/trained_0_seed1.png"}},
    ]
    assert 'pipe("a cat"' in text and "from diffusers import StableDiffusionPipeline" in text

    # a model family names its own diffusers pipeline class in the loading snippet
    family = SimpleNamespace(pipeline_class_name="StableDiffusion3Pipeline")
    monkeypatch.setattr(trainer.sd_pipeline, "family", family, raising=False)
    text = build_model_card(trainer).text
    assert "from diffusers import StableDiffusion3Pipeline" in text
    assert "StableDiffusion3Pipeline.from_pretrained(" in text and "## Samples" not in text
