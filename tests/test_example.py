import argparse
import csv
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
    _, config, preset = train_sd.parse_args(["--pretrained_model", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
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
    # what the run did travels with the weights: samples of the base and the trained model, and their reward
    assert "samples" in files and sorted(os.listdir(out / "lora" / "samples")) == [
        "base_0_seed0.png", "base_0_seed1.png", "trained_0_seed0.png", "trained_0_seed1.png"
    ]
    assert "![trained, seed 1](samples/trained_0_seed1.png)" in card.text
    assert "| reward `helpers:brightness_reward`, mean of the 2 samples above |" in card.text
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


def _tiny(tiny_model_dir, tmp_path, *extra):
    return ["--pretrained_model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), *TINY_RUN, *extra]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompts_file", "no/such/prompts.txt"], "error: --prompts_file no/such/prompts.txt: no such file"),
        (["--prompts", "a cat", "--reward", "nope"], "error: --reward nope: unknown reward 'nope'. Known rewards: "),
        (["--prompts", "a cat", "--reward", "clip_score", "--reward_model", "./no/such/clip"],
         "error: --reward_model: `model_name_or_path`='./no/such/clip' looks like a local path but does not exist"),
        (["--prompts", "a cat", "--reward", "clip_score"],
         "error: --reward clip_score: `model_name_or_path`='laion/CLIP-ViT-H-14-laion2B-s32B-b79K' is not in the"),
        (["--prompts", "a cat", "--reward_kwargs", "[1]"], "error: --reward_kwargs: expected a JSON object"),
    ],
)
def test_wrong_inputs_stop_with_one_error_line_naming_the_flag(train_sd, tiny_model_dir, tmp_path, monkeypatch,
                                                                 flags, message):
    import huggingface_hub.constants

    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as stop:
        train_sd.main(_tiny(tiny_model_dir, tmp_path, *flags))  # a later --reward wins over TINY_RUN's
    text = str(stop.value.code)
    assert text.startswith(message) and "\n" not in text
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # it stopped before training


@pytest.mark.parametrize("model", ["nobody-xyz/no-such-model", "./no/such/pipeline"])
def test_a_model_that_cannot_be_loaded_is_named(train_sd, tmp_path, monkeypatch, model):
    monkeypatch.chdir(Path(__file__).parent)
    with pytest.raises(SystemExit, match=f"^error: --pretrained_model {model}: "):
        train_sd.main(["--pretrained_model", model, "--prompts", "a cat", "--reward", "helpers:brightness_reward",
                       "--output_dir", str(tmp_path / "out")])


def test_prompts_from_a_dataset_saved_to_disk(train_sd, tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"prompt": ["a cat", "a dog"]}).save_to_disk(str(tmp_path / "one"))
    args, _, _ = train_sd.parse_args(["--prompts_dataset", str(tmp_path / "one")])
    assert train_sd.load_prompts(args, is_toy=False) == ["a cat", "a dog"]

    splits = DatasetDict({"train": Dataset.from_dict({"text": ["a"]}), "test": Dataset.from_dict({"text": ["b"]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    args, _, _ = train_sd.parse_args(["--prompts_dataset", str(tmp_path / "dict"), "--prompts_dataset_split", "test",
                                      "--prompts_dataset_column", "text"])
    assert train_sd.load_prompts(args, is_toy=False) == ["b"]
    args, _, _ = train_sd.parse_args(["--prompts_dataset", str(tmp_path / "dict"), "--prompts_dataset_split", "dev"])
    with pytest.raises(SystemExit, match=r"--prompts_dataset_split 'dev' not in \['train', 'test'\]"):
        train_sd.load_prompts(args, is_toy=False)
    args, _, _ = train_sd.parse_args(["--prompts_dataset", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=f"^error: --prompts_dataset {tmp_path / 'none'}: "):
        train_sd.load_prompts(args, is_toy=False)


def test_metrics_start_clean_but_a_resumed_run_keeps_the_stages_before_it(train_sd, tmp_path):
    rows = [{"time_s": 1.0 + k, "stage": k, "reward_mean": 0.1 * k} for k in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"time_s": 9, "sta')

    resumed = train_sd.MetricsWriter(str(tmp_path), resume_stage=2)  # stages 2 and 3 run again
    assert [r["stage"] for r in resumed.rows] == [0, 1]
    resumed(None, {"stage": 2, "reward_mean": 0.5})
    stages = [json.loads(line)["stage"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert stages == [0, 1, 2]
    assert resumed.rows[-1]["time_s"] >= 2.0  # the clock goes on from the kept rows
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["stage"]) for r in csv.DictReader(f)] == [0, 1, 2]

    train_sd.MetricsWriter(str(tmp_path))  # a fresh run into the same folder
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert (tmp_path / "metrics.csv").read_text().strip() == ""


def test_a_launch_accelerate_did_not_see_stops(train_sd, tiny_model_dir, tmp_path, monkeypatch):
    # torchrun started 2 processes, but without --accelerator_kwargs '{"cpu": true}' a CPU-only machine gives
    # each a single-process state: they would train two separate models
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"WORLD_SIZE=2.*--accelerator_kwargs '\{\"cpu\": true\}'"):
        train_sd.main(_tiny(tiny_model_dir, tmp_path, "--prompts", "a cat"))


def test_the_flow_toy_model_gets_the_toy_preset_with_its_own_settings(train_sd):
    _, config, preset = train_sd.parse_args(["--pretrained_model", "toy-sd3"])
    assert preset == "toy" and config.num_epochs == train_sd.PRESETS["toy"]["num_epochs"]
    assert (config.sample_batch_size, config.num_branches) == (16, 4)
    assert config.interval_schedule.anchor == "start" and config.interval_schedule.interval(9, 20) == (0, 16)
    assert config.train_learning_rate == train_sd.TOY_FLOW["train_learning_rate"] != train_sd.PRESETS["toy"][
        "train_learning_rate"]
    assert config.noise_level == train_sd.TOY_FLOW["noise_level"]
    _, config, _ = train_sd.parse_args(["--pretrained_model", "toy-sd3", "--train_learning_rate", "1e-4"])
    assert config.train_learning_rate == 1e-4  # flags still override the preset
    _, config, _ = train_sd.parse_args([])
    assert config.train_learning_rate == train_sd.PRESETS["toy"]["train_learning_rate"]  # the SD toy unchanged
    assert config.interval_schedule.anchor == "end" and config.num_branches == train_sd.PRESETS["toy"]["num_branches"]
