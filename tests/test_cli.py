"""The `b2trl` command: parsing (YAML under flags, method presets, grouped help), one-line errors naming the flag,
`b2trl train --config` on the toy model, `b2trl eval` of a LoRA against the toy world's own evaluation."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from b2trl import B2DiffuRLConfig, IntervalSchedule
from b2trl.cli import groups, main
from b2trl.cli import toy as toy_cli
from b2trl.cli import train as train_cli

TESTS = Path(__file__).resolve().parent
TINY_RUN = [
    "--num_epochs", "2", "--sample_num_steps", "6", "--sample_batch_size", "2",
    "--sample_num_batches_per_epoch", "1", "--num_branches", "3", "--initial_length", "2", "--num_stages", "2",
    "--train_gradient_accumulation_steps", "1", "--reward", "helpers:brightness_reward",
    "--selection_rule", "best_worst",  # see helpers.small_config
]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------- parsing


def test_yaml_gives_defaults_and_flags_override_it(tmp_path, monkeypatch):
    monkeypatch.delenv("B2TRL_TEST_ENV", raising=False)
    run = _write(tmp_path / "run.yaml", """
pretrained_model: some/model
num_epochs: 3
train_learning_rate: 1e-4      # a float, not the string YAML 1.1 makes of it
mixed_precision: no            # the string "no", not False
accelerator_kwargs: {cpu: true}
prompts: [a cat, a dog]
interval_schedule:
  initial_length: 5
  num_stages: 7
env:
  B2TRL_TEST_ENV: "1"
""")
    args, config = train_cli.parse_args(["--config", run, "--num_epochs", "5", "--num_stages", "9"])
    assert args.pretrained_model == "some/model" and args.prompts == ["a cat", "a dog"]
    assert config.num_epochs == 5  # the flag wins
    assert config.train_learning_rate == 1e-4 and config.mixed_precision == "no"
    assert config.accelerator_kwargs == {"cpu": True}
    assert (config.interval_schedule.initial_length, config.interval_schedule.num_stages) == (5, 9)
    assert os.environ["B2TRL_TEST_ENV"] == "1"
    # the flat schedule fields are accepted in the file too
    flat = _write(tmp_path / "flat.yaml", "pretrained_model: m\ninitial_length: 3\n")
    assert train_cli.parse_args(["--config", flat])[1].interval_schedule.initial_length == 3


@pytest.mark.parametrize("text, message", [
    ("pretrained_model: m\nnum_epoch: 3\n", "unknown field 'num_epoch' (did you mean 'num_epochs'?)"),
    ("pretrained_model: m\nnum_epochs: many\n", "num_epochs: invalid literal for int()"),
    ("pretrained_model: m\nselection_rule: best\n", "selection_rule: 'best' is not one of"),
    ("pretrained_model: m\ninterval_schedule: {length: 3}\n", "interval_schedule has unknown field(s) ['length']"),
    ("- a list\n", "expected a mapping of field names to values, got list"),
])
def test_a_bad_config_file_is_one_line_naming_the_field(tmp_path, text, message):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as stop:
        train_cli.parse_args(["--config", path])
    assert str(stop.value.code).startswith(f"error: --config {path}: ") and message in str(stop.value.code)
    assert "\n" not in str(stop.value.code)


def test_method_presets_sit_between_the_defaults_and_the_file_and_flags(tmp_path):
    _, config = train_cli.parse_args(["--pretrained_model", "m", "--method", "flow_grpo"])
    assert config == B2DiffuRLConfig.for_method("flow_grpo", exp_name="train")
    _, config = train_cli.parse_args(["--pretrained_model", "m", "--method", "ddpo", "--sample_num_steps", "10",
                                      "--train_clip_range", "0.2"])
    assert config.method == "ddpo" and config.num_branches == 1 and config.train_clip_range == 0.2
    assert config.interval_schedule.initial_length == 10  # "every step" follows the final number of steps
    path = _write(tmp_path / "m.yaml", "pretrained_model: m\nmethod: b2_pairs\nhistory_stages: 2\n")
    _, config = train_cli.parse_args(["--config", path])
    assert (config.method, config.selection_rule, config.history_stages) == ("b2_pairs", "pairs", 2)
    # the toy preset sets the scale; a method's settings win over it where both set a field, flags over both
    _, config, _ = toy_cli.parse_args(["--method", "ddpo", "--num_epochs", "3"])
    assert config.num_branches == 1 and config.interval_schedule.initial_length == 20
    assert config.sample_batch_size == 32 and config.train_learning_rate == 1e-3 and config.num_epochs == 3


def test_the_toy_presets_and_flags_over_them():
    from b2trl.toy.main import FLOW_PRESET, PRESET

    args, config, _ = toy_cli.parse_args([])
    assert args.pretrained_model == "toy" and config.num_epochs == PRESET["num_epochs"]
    assert (config.sample_batch_size, config.num_branches, config.train_learning_rate) == (32, 2, 1e-3)
    assert config.interval_schedule.initial_length == 14 and config.interval_schedule.anchor == "end"
    assert config.selection_rule == "pairs"  # the trainer's default rule; the flow preset keeps the paper's
    _, config, _ = toy_cli.parse_args(["--pretrained_model", "toy-sd3", "--train_learning_rate", "1e-4"])
    assert config.selection_rule == "best_worst"
    assert (config.sample_batch_size, config.num_branches) == (16, 4) and config.noise_level == FLOW_PRESET[
        "noise_level"]
    assert config.interval_schedule.anchor == "start" and config.interval_schedule.interval(9, 20) == (0, 16)
    assert config.train_learning_rate == 1e-4


def test_dict_flags_take_json_and_the_schedule_one_object(capsys):
    _, config = train_cli.parse_args(["--pretrained_model", "m", "--accelerator_kwargs", '{"cpu": true}',
                                      "--interval_schedule", '{"initial_length": 3, "num_stages": 5}'])
    assert config.accelerator_kwargs == {"cpu": True}
    assert (config.interval_schedule.initial_length, config.interval_schedule.num_stages) == (3, 5)
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--pretrained_model", "m", "--project_kwargs", "[1, 2]"])
    assert "expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--sample_num_steps", "4", "--initial_length", "6"], "error: --initial_length (6) is longer than the trajectory"),
    (["--sample_eta", "0"], "error: --sample_eta must be > 0"),
    (["--num_epochs", "x"], "error: argument --num_epochs: invalid int value: 'x'"),
    (["--num_epoch", "3"], "error: unrecognized arguments: --num_epoch 3 (did you mean --num_epochs?)"),
])
def test_invalid_settings_are_one_line_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        train_cli.parse_args(["--pretrained_model", "m", *argv])
    # argparse's own errors exit with status 2 after printing; the configuration's carry their text
    text = capsys.readouterr().err.strip() if stop.value.code == 2 else str(stop.value.code)
    assert text.startswith(message) and "\n" not in text
    with pytest.raises(SystemExit, match="^error: --pretrained_model is required"):
        train_cli.parse_args(argv[:0])


def test_help_is_grouped_and_documents_every_flag(capsys):
    fields = {f.name for cls in (B2DiffuRLConfig, IntervalSchedule) for f in dataclasses.fields(cls) if f.init}
    ignored = set(groups.replaced_trl_fields())
    from b2trl.cli import evaluate

    for name, module in (("train", train_cli), ("toy", toy_cli), ("eval", evaluate)):
        parser = module.build_parser()
        sections = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert [a.option_strings for a in flags if not a.help or a.help == argparse.SUPPRESS] == []
        assert {a.dest: sections[a.dest] for a in flags if sections[a.dest] in ("options", groups.OTHER)} == {}
        help_text = parser.format_help()
        if name != "eval":  # the training commands expose every config and schedule field
            assert fields <= {a.dest for a in flags}
            assert all(f"--{f} " in help_text or f"--{f}\n" in help_text for f in fields)
            assert {f for f in fields if sections[f] == groups.IGNORED} == ignored
            assert sections["method"] == sections["initial_length"] == "method & schedule"
            assert sections["sample_batch_size"] == "sampling" and sections["output_dir"] == "logging & output"
        assert "--sample-num-steps" not in help_text  # each flag once, not its dashed alias


def test_the_command_dispatches_and_runs_as_a_module():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(TESTS.parent)
    done = subprocess.run([sys.executable, "-m", "b2trl", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and all(f"  {c} " in done.stdout for c in ("train", "eval", "toy")), done.stderr
    done = subprocess.run([sys.executable, "-m", "b2trl", "trian"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == ("error: unknown command 'trian'; b2trl's commands are "
                                                            "train, eval, toy (b2trl --help)")


# ---------------------------------------------------------------------------------------------- runs


def test_train_from_a_config_file_runs_one_stage_on_the_toy_model(tmp_path):
    run = _write(tmp_path / "run.yaml", """
pretrained_model: toy
num_epochs: 1
sample_num_steps: 6
sample_batch_size: 2
sample_num_batches_per_epoch: 1
num_branches: 2
train_gradient_accumulation_steps: 1
mixed_precision: no
interval_schedule: {initial_length: 2, num_stages: 1}
""")
    out = tmp_path / "out"
    main(["train", "--config", run, "--output_dir", str(out), "--no_branch_images"])
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (row["stage"], row["interval_length"], row["groups_total"], row["samples_total"]) == (0, 2, 2, 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward"] == "toy_alignment" and summary["saved"] == str(out / "lora")
    card = (out / "lora" / "README.md").read_text()
    assert "model_path()" in card and "| reward `toy_alignment`, mean of the 4 samples above |" in card
    assert sorted(os.listdir(out / "lora" / "samples")) == [
        "base_0_seed0.png", "base_0_seed1.png", "base_1_seed0.png", "base_1_seed1.png",
        "trained_0_seed0.png", "trained_0_seed1.png", "trained_1_seed0.png", "trained_1_seed1.png"]


@pytest.fixture(scope="module")
def perturbed_lora(tmp_path_factory):
    """A LoRA on the SD toy model whose samples differ from the base model's (random up-projections)."""
    import torch

    from b2trl import load_pipeline
    from b2trl.toy import model_path

    pipeline = load_pipeline(model_path(), use_lora=True)
    pipeline.get_trainable_layers()  # adds the adapter, as the trainer does
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipeline.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("run") / "lora"
    pipeline.family.save_lora(pipeline.unet, str(folder))
    return folder


def test_eval_scores_the_base_and_a_lora_as_the_toy_evaluation_does(perturbed_lora, tmp_path, capsys):
    from b2trl.cli import evaluate
    from b2trl.toy import evaluate_alignment, heldout_prompts

    prompts, seeds = heldout_prompts()[:3], [0, 1]
    out = tmp_path / "eval"
    written = evaluate.main(["--base", "toy", "--lora", str(perturbed_lora.parent), "--prompts", *prompts,
                             "--seeds", "0", "1", "--reward", "toy_alignment", "jpeg_compressibility",
                             "--num_inference_steps", "8", "--batch_size", "64", "--output_dir", str(out)])
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(written))
    scores, run = written["rewards"], perturbed_lora.parent.name
    # a run's folder stands for its lora/, and names the column
    assert list(scores) == ["toy_alignment", "jpeg_compressibility"] and list(scores["toy_alignment"]) == ["base", run]
    assert written["models"][run] == {"model": "toy", "lora": str(perturbed_lora)}
    # the same prompts, seeds and noise as the toy world's own evaluation, base and LoRA
    for column, lora in (("base", None), (run, str(perturbed_lora))):
        reference = evaluate_alignment(None, lora_path=lora, prompts=prompts, seeds=seeds, num_inference_steps=8)
        assert scores["toy_alignment"][column]["per_seed"] == pytest.approx(reference["per_seed"], abs=1e-6)
        assert scores["toy_alignment"][column]["per_prompt"] == pytest.approx(reference["per_prompt"], abs=1e-6)
    jpeg = scores["jpeg_compressibility"]
    assert jpeg["base"]["per_prompt"] != jpeg[run]["per_prompt"]  # the LoRA changed the pictures
    table = capsys.readouterr().out
    assert "reward                base" in table and f"{jpeg[run]['mean']:.4f} ± {jpeg[run]['seed_std']:.4f}" in table
    from PIL import Image

    grid = Image.open(out / "eval_grid.png")
    assert grid.width > 2 * 2 * 32 and grid.height > 3 * 32  # 2 models x 2 seeds per row, 3 prompt rows


def test_eval_names_the_flag_of_a_folder_without_weights(tmp_path):
    from b2trl.cli import evaluate

    with pytest.raises(SystemExit, match=r"^error: --lora .*: no pytorch_lora_weights.safetensors there"):
        evaluate.main(["--base", "toy", "--lora", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^error: --labels: 2 given for 1 models"):
        evaluate.main(["--base", "toy", "--labels", "a", "b"])
    with pytest.raises(SystemExit, match=r"^error: --base is required"):
        evaluate.main([])
    with pytest.raises(SystemExit, match=r"^error: --resolution must be a positive multiple of the VAE's scale"):
        evaluate.main(["--base", "toy", "--resolution", "13", "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------- errors before work


def _tiny(model_dir, tmp_path, *extra):
    return ["--pretrained_model", model_dir, "--output_dir", str(tmp_path / "out"), *TINY_RUN, *extra]


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
        (["--prompts", "a cat", "--prompts_file", "p.txt"], "error: give at most one of --prompts, --prompts_file"),
    ],
)
def test_wrong_inputs_stop_with_one_error_line_naming_the_flag(tiny_model_dir, tmp_path, monkeypatch, flags,
                                                                 message):
    import huggingface_hub.constants

    monkeypatch.chdir(TESTS)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as stop:
        train_cli.main(_tiny(tiny_model_dir, tmp_path, *flags))  # a later --reward wins over TINY_RUN's
    text = str(stop.value.code)
    assert text.startswith(message) and "\n" not in text
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # it stopped before training


@pytest.mark.parametrize("argv, message", [
    (["toy", "--pretrained_model", "toy-sd3", "--noise_level", "0"], "error: --noise_level must be > 0, got 0.0: "),
    (["train", "--pretrained_model", "toy-sd3", "--noise_level", "0"], "error: --noise_level must be > 0, got 0.0: "),
    (["toy", "--resolution", "13"], "error: --resolution must be a positive multiple of the VAE's scale factor 4, "),
    (["train", "--pretrained_model", "toy", "--method", "flow_grpo"], "error: --method='flow_grpo' is defined for "
                                                                      "flow-matching models"),
    (["train", "--pretrained_model", "nobody-xyz/no-such-model", "--reward", "helpers:brightness_reward"],
     "error: --pretrained_model nobody-xyz/no-such-model: "),
    (["train", "--pretrained_model", "./no/such/pipeline", "--reward", "helpers:brightness_reward"],
     "error: --pretrained_model ./no/such/pipeline: "),
])
def test_what_the_model_cannot_do_stops_before_any_sampling(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(TESTS)
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--output_dir", str(tmp_path / "out")])
    text = str(stop.value.code)
    assert text.startswith(message) and "\n" not in text
    assert "Evaluating the base model" not in capsys.readouterr().out  # before the (slow) held-out evaluation
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_launch_accelerate_did_not_see_stops(tiny_model_dir, tmp_path, monkeypatch):
    # torchrun started 2 processes, but without --accelerator_kwargs '{"cpu": true}' a CPU-only machine gives
    # each a single-process state: they would train two separate models
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"WORLD_SIZE=2.*--accelerator_kwargs '\{\"cpu\": true\}'"):
        train_cli.main(_tiny(tiny_model_dir, tmp_path, "--prompts", "a cat"))


# ---------------------------------------------------------------------------------------------- outputs


def test_prompts_from_a_file_or_a_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    from b2trl.cli.loading import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert read_prompts(prompts_file=str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "train.csv").write_text("text,score\na cat,1\na dog,2\n")
    assert read_prompts(prompts_dataset=str(folder), column="text") == ["a cat", "a dog"]
    with pytest.raises(SystemExit, match=r"^error: --prompts_dataset_column 'prompt' not in \['text', 'score'\]"):
        read_prompts(prompts_dataset=str(folder))
    splits = DatasetDict({"train": Dataset.from_dict({"text": ["a"]}), "test": Dataset.from_dict({"text": ["b"]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert read_prompts(prompts_dataset=str(tmp_path / "dict"), split="test", column="text") == ["b"]
    with pytest.raises(SystemExit, match=r"--prompts_dataset_split 'dev' not in \['train', 'test'\]"):
        read_prompts(prompts_dataset=str(tmp_path / "dict"), split="dev")
    with pytest.raises(SystemExit, match=f"^error: --prompts_dataset {tmp_path / 'none'}: "):
        read_prompts(prompts_dataset=str(tmp_path / "none"))
    assert read_prompts(default=("x",)) == ["x"]


def test_train_pushes_a_card_with_samples_and_a_later_run_continues_from_it(tiny_model_dir, tmp_path, monkeypatch):
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
    monkeypatch.chdir(TESTS)
    out = tmp_path / "first"
    main(["train", "--pretrained_model", tiny_model_dir, "--prompts", "a cat", "--output_dir", str(out),
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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub_url"] == "https://hf.co/me/tiny-b2" and summary["reward"] == "helpers:brightness_reward"
    assert [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (out / "metrics.csv").read_text().count("\n") == 3
    assert sorted(p.name for p in (out / "branches").iterdir())
    # the pushed folder is what a later run continues from; with an EMA kept, its weights are saved beside
    main(["train", "--pretrained_model", tiny_model_dir, "--prompts", "a cat", "--output_dir", str(tmp_path / "two"),
          "--init_lora", str(out / "lora"), "--ema_decay", "0.5", *TINY_RUN, "--num_epochs", "1"])
    from diffusers import StableDiffusionPipeline

    for folder in ("lora", "lora_ema"):
        StableDiffusionPipeline.from_pretrained(tiny_model_dir).load_lora_weights(str(tmp_path / "two" / folder))


def test_metrics_start_clean_but_a_resumed_run_keeps_the_stages_before_it(tmp_path):
    import csv

    from b2trl.metrics import MetricsWriter

    rows = [{"time_s": 1.0 + k, "stage": k, "reward_mean": 0.1 * k} for k in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"time_s": 9, "sta')

    resumed = MetricsWriter(str(tmp_path), resume_stage=2)  # stages 2 and 3 run again
    assert [r["stage"] for r in resumed.rows] == [0, 1]
    resumed(None, {"stage": 2, "reward_mean": 0.5})
    stages = [json.loads(line)["stage"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert stages == [0, 1, 2]
    assert resumed.rows[-1]["time_s"] >= 2.0  # the clock goes on from the kept rows
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["stage"]) for r in csv.DictReader(f)] == [0, 1, 2]

    MetricsWriter(str(tmp_path))  # a fresh run into the same folder
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert (tmp_path / "metrics.csv").read_text().strip() == ""


def test_eval_of_full_pipelines_loads_each_and_gives_the_same_noise_to_each(tiny_model_dir, tmp_path, monkeypatch):
    from b2trl.cli import evaluate

    monkeypatch.chdir(TESTS)  # for 'helpers:brightness_reward'
    written = evaluate.main(["--base", tiny_model_dir, "--pipelines", tiny_model_dir, "--labels", "one", "two",
                             "--prompts", "a cat", "a dog", "--seeds", "3", "--reward", "helpers:brightness_reward",
                             "--num_inference_steps", "3", "--output_dir", str(tmp_path)])
    scores = written["rewards"]["helpers:brightness_reward"]
    assert written["models"] == {"one": {"model": tiny_model_dir}, "two": {"model": tiny_model_dir}}
    assert scores["one"]["per_prompt"] == scores["two"]["per_prompt"]  # the same weights on the same noise
    assert scores["one"]["per_prompt"]["a cat"] != scores["one"]["per_prompt"]["a dog"]
