"""examples/train_sd.py, the recipe to copy: it takes `b2trl train`'s flags (and its --config file), trains, saves a
LoRA that diffusers loads, pushes it, and a later run continues from the pushed weights."""

import os
from pathlib import Path

from diffusers import StableDiffusionPipeline

from helpers import load_script

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "train_sd.py"
TINY_RUN = [
    "--num_epochs", "2", "--sample_num_steps", "6", "--sample_batch_size", "2",
    "--sample_num_batches_per_epoch", "1", "--num_branches", "3", "--initial_length", "2", "--num_stages", "2",
    "--train_gradient_accumulation_steps", "1", "--reward", "helpers:brightness_reward",
    "--selection_rule", "best_worst",  # see helpers.small_config
]


def test_the_recipe_trains_saves_pushes_and_continues(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    recipe = load_script(EXAMPLE, "train_sd_recipe")
    uploads = []

    class RepoUrl(str):
        repo_id = "me/tiny-b2"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, *, repo_id, folder_path, **kw: uploads.append((repo_id, os.listdir(folder_path))))
    monkeypatch.chdir(TESTS)  # so that 'helpers:brightness_reward' imports
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "run.yaml").write_text(f"pretrained_model: {tiny_model_dir}\nmethod: b2_pairs\n")
    out = tmp_path / "out"
    recipe.main(["--config", str(tmp_path / "run.yaml"), "--prompts_file", str(tmp_path / "prompts.txt"),
                 "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "me/tiny-b2", *TINY_RUN])
    ((repo, files),) = uploads
    assert repo == "me/tiny-b2" and {"pytorch_lora_weights.safetensors", "README.md"} <= set(files)
    card = (out / "lora" / "README.md").read_text()
    assert "`b2_pairs`" in card and "| stages trained | 2 |" in card and "helpers:brightness_reward" in card
    StableDiffusionPipeline.from_pretrained(tiny_model_dir).load_lora_weights(str(out / "lora"))

    recipe.main(["--pretrained_model", tiny_model_dir, "--prompts", "a cat", "--output_dir", str(tmp_path / "two"),
                 "--init_lora", str(out / "lora"), *TINY_RUN, "--num_epochs", "1"])
    assert (tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_the_recipe_stays_a_page():
    lines = EXAMPLE.read_text().splitlines()
    assert len(lines) <= 120, f"examples/train_sd.py has {len(lines)} lines; keep the recipe readable on one page"
