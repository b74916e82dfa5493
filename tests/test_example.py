import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from helpers import load_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sd.py"


@pytest.fixture(scope="module")
def train_sd():
    return load_script(EXAMPLE, "train_sd")


TINY_RUN = [
    "--num_epochs", "2", "--sample_num_steps", "6", "--sample_batch_size", "2",
    "--sample_num_batches_per_epoch", "1", "--num_branches", "3", "--initial_length", "2", "--num_stages", "2",
    "--train_gradient_accumulation_steps", "1", "--reward", "helpers:brightness_reward",
]


@pytest.mark.parametrize("preset", ["toy", "reference"])
def test_help_documents_every_flag(train_sd, preset):
    parser = train_sd.build_parser(preset)
    undocumented = [
        a.option_strings for a in parser._actions
        if a.option_strings and a.dest != "help" and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert undocumented == []


def test_presets_set_defaults_and_flags_override_them(train_sd):
    args, config, preset = train_sd.parse_args(["--num_epochs", "3"])
    assert preset == "toy" and config.num_epochs == 3
    assert config.num_branches == train_sd.PRESETS["toy"]["num_branches"]
    assert config.interval_schedule.initial_length == train_sd.PRESETS["toy"]["initial_length"]
    _, config, preset = train_sd.parse_args(["--pretrained_model", "runwayml/stable-diffusion-v1-5"])
    assert preset == "reference" and config.num_branches == 5 and config.interval_schedule.initial_length == 14


def test_invalid_configuration_exits_with_the_field_named(train_sd, capsys):
    with pytest.raises(SystemExit):
        train_sd.parse_args(["--sample_num_steps", "4", "--initial_length", "6"])
    assert "initial_length" in capsys.readouterr().err


def test_runs_on_a_local_model_with_prompts_from_a_file(train_sd, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)  # so that 'helpers:brightness_reward' imports
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "out"
    train_sd.main(["--pretrained_model", tiny_model_dir, "--prompts_file", str(prompts), "--output_dir", str(out),
                   *TINY_RUN])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [0, 1]
    assert (out / "metrics.csv").read_text().count("\n") == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward"] == "helpers:brightness_reward"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(out / "lora"))
    if importlib.util.find_spec("matplotlib"):
        assert (out / "reward_curve.png").stat().st_size > 0


def test_prompts_from_a_local_dataset(train_sd, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.csv").write_text("text,score\na cat,1\na dog,2\n")
    args, _, _ = train_sd.parse_args(["--prompts_dataset", str(folder), "--prompts_dataset_column", "text"])
    assert train_sd.load_prompts(args, is_toy=False) == ["a cat", "a dog"]
    args, _, _ = train_sd.parse_args(["--prompts_dataset", str(folder), "--prompts_dataset_column", "prompt"])
    with pytest.raises(SystemExit, match="prompt"):
        train_sd.load_prompts(args, is_toy=False)


def test_push_to_hub_and_continue_from_the_pushed_lora(train_sd, tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    uploads = []

    class RepoUrl(str):
        repo_id = "me/tiny-b2"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, *, repo_id, folder_path, **kw: uploads.append(
            (repo_id, sorted(os.listdir(folder_path)), ModelCard.load(os.path.join(folder_path, "README.md")))
        ),
    )
    monkeypatch.chdir(Path(__file__).parent)
    out = tmp_path / "first"
    train_sd.main(["--pretrained_model", tiny_model_dir, "--prompts", "a cat", "--output_dir", str(out),
                   "--push_to_hub", "--hub_model_id", "me/tiny-b2", *TINY_RUN])
    ((repo, files, card),) = uploads
    assert repo == "me/tiny-b2" and "pytorch_lora_weights.safetensors" in files
    assert "| stages trained | 2 |" in card.text and "helpers:brightness_reward" in card.text
    assert json.loads((out / "summary.json").read_text())["hub_url"] == "https://hf.co/me/tiny-b2"
    assert sorted(p.name for p in (out / "branches").iterdir()) and (out / "branches").is_dir()

    # the pushed folder is what a later run continues from
    train_sd.main(["--pretrained_model", tiny_model_dir, "--prompts", "a cat", "--output_dir", str(tmp_path / "two"),
                   "--init_lora", str(out / "lora"), "--num_epochs", "1", *TINY_RUN[2:]])


def test_dict_flags_take_json(train_sd, capsys):
    _, config, _ = train_sd.parse_args(
        ["--accelerator_kwargs", '{"cpu": true}', "--interval_schedule", '{"initial_length": 3, "num_stages": 5}']
    )
    assert config.accelerator_kwargs == {"cpu": True}
    assert config.interval_schedule.initial_length == 3 and config.interval_schedule.num_stages == 5
    with pytest.raises(SystemExit):
        train_sd.parse_args(["--project_kwargs", "[1, 2]"])
    assert "expected a JSON object" in capsys.readouterr().err
