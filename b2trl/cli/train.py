"""`b2trl train`: fine-tune a model with B²-DiffuRL (or any named method) from flags or a YAML file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .parsing import parse_training_command, training_parser


def arg(default, help: str, **metadata):
    """A command argument's dataclass field with its `--help` text."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainArguments:
    """The arguments of `b2trl train` besides `B2DiffuRLConfig`'s and `IntervalSchedule`'s fields."""

    pretrained_model: Optional[str] = arg(None, "Base pipeline (required): a Hub id (e.g. "
                                          "stable-diffusion-v1-5/stable-diffusion-v1-5), a local diffusers folder, or "
                                          "'toy' / 'toy-sd3' for b2trl's shipped toy models. The family (SD1.x, SDXL, "
                                          "SD3, FLUX.1, Qwen-Image, Z-Image) is read from its model_index.json.")
    pretrained_revision: str = arg("main", "Hub revision of --pretrained_model.")
    pretrained_vae: Optional[str] = arg(None, "A VAE to use instead of the model's own (Hub id or folder), e.g. "
                                        "madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.")
    use_lora: bool = arg(True, "Train a LoRA adapter (false: the whole denoiser).")
    init_lora: Optional[str] = arg(None, "Start from these LoRA weights (a folder a previous run saved).")
    prompts: Optional[list[str]] = arg(None, "Training prompts, given inline.")
    prompts_file: Optional[str] = arg(None, "A text file with one prompt per line.")
    prompts_dataset: Optional[str] = arg(None, "A `datasets` dataset to read prompts from: a Hub id, a local folder "
                                         "of data files, or a folder written by `save_to_disk`.")
    prompts_dataset_split: str = arg("train", "Split of --prompts_dataset.")
    prompts_dataset_column: str = arg("prompt", "Column of --prompts_dataset.")
    reward: str = arg("auto", "Reward: a registered name (b2trl.rewards.list_rewards(): aesthetic, clip_score, "
                      "pickscore, hpsv2, toy_alignment, ...) or 'module:function' for your own (importable, or in the "
                      "working directory); 'auto': toy_alignment for a toy model, else aesthetic.")
    reward_model: Optional[str] = arg(None, "model_name_or_path of a model-based reward (Hub id or local folder).")
    reward_kwargs: str = arg("{}", "JSON object of further keyword arguments for the reward.", metavar="JSON")
    output_dir: str = arg("outputs/train", "Where the weights, metrics and plots go (and, unless project_kwargs "
                          "says otherwise, checkpoints and tracker logs).")
    hub_model_id: Optional[str] = arg(None, "Repository id for --push_to_hub (default: the output folder's name).")
    branch_images: bool = arg(True, "Save a grid of each stage's branch groups with their rewards (and log it to "
                              "the tracker).")


DESCRIPTION = """Fine-tune a text-to-image diffusion model with reinforcement learning: B²-DiffuRL by default, or any
method b2trl names (--method). Every B2DiffuRLConfig and IntervalSchedule field is a flag; --config reads the same
fields from a YAML file, and flags given here override it."""

EPILOG = """examples:
  b2trl train --pretrained_model toy --num_epochs 2 --sample_batch_size 4 --train_gradient_accumulation_steps 1
  accelerate launch -m b2trl train --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --reward clip_score --prompts_file prompts.txt --method b2_pairs --log_with tensorboard
  b2trl train --config run.yaml --num_epochs 50        # the file's settings, 50 stages

methods: b2 (the default settings), b2_pairs, b2_grpo, ddpo, d3po, flow_grpo, flow_grpo_fast, mix_grpo
  (b2trl.list_methods(); docs/methods.md)"""


HELP = dict(prog="b2trl train", description=DESCRIPTION, epilog=EPILOG)


def build_parser():
    """The parser of `b2trl train` (its defaults before a file or a preset)."""
    return training_parser(TrainArguments, **HELP)


def parse_args(argv=None):
    """`(TrainArguments, B2DiffuRLConfig)` from the command line (and `--config`)."""
    args, config, _ = parse_training_command(argv, TrainArguments, **HELP,
                                             preset_for=lambda model: {"exp_name": "train"})
    if not args.pretrained_model:
        raise SystemExit("error: --pretrained_model is required: a Hub id, a diffusers folder, or 'toy' / 'toy-sd3' "
                         "(in the YAML file: pretrained_model: ...)")
    return args, config


def main(argv=None) -> Optional[dict]:
    """Run `b2trl train`; returns the run's summary on the main process."""
    from ..prompts import ANIMAL_ACTIVITY_PROMPTS
    from ..toy import TOY_MODELS, train_prompts
    from .loading import (
        build_reward,
        check_config_for_model,
        load_base_pipeline,
        read_prompts,
        reward_kwargs_for,
        start_processes,
    )
    from .parsing import training_fields
    from .run import CardSamples, run_training

    args, config = parse_args(argv)
    state = start_processes(config)  # first: see start_processes
    is_toy = args.pretrained_model in TOY_MODELS
    os.makedirs(args.output_dir, exist_ok=True)
    # checkpoints and tracker logs live beside the outputs unless the user points them elsewhere
    config.project_kwargs.setdefault("project_dir", args.output_dir)
    if state.is_main_process:
        method = f"method {config.method}, " if config.method else ""
        print(f"b2trl train: {method}model {args.pretrained_model}, output {args.output_dir}, "
              f"{state.num_processes} process(es)")
    reward_name = args.reward if args.reward != "auto" else ("toy_alignment" if is_toy else "aesthetic")
    reward_fn = build_reward(reward_name, reward_kwargs_for([reward_name], args.reward_kwargs)[reward_name],
                             reward_model=args.reward_model)
    prompts = read_prompts(args.prompts, args.prompts_file, args.prompts_dataset, args.prompts_dataset_split,
                           args.prompts_dataset_column,
                           default=train_prompts() if is_toy else ANIMAL_ACTIVITY_PROMPTS)
    pipeline = load_base_pipeline(args.pretrained_model, revision=args.pretrained_revision, use_lora=args.use_lora,
                                  pretrained_vae=args.pretrained_vae)
    check_config_for_model(config, pipeline, training_fields(TrainArguments))
    return run_training(
        state, config, pipeline, reward_name=reward_name, reward_fn=reward_fn, prompts=prompts,
        output_dir=args.output_dir, report=CardSamples(prompts, reward_name, reward_fn),
        base_model=args.pretrained_model, hub_model_id=args.hub_model_id, init_lora=args.init_lora,
        branch_images=args.branch_images, summary={"method": config.method},
    )
