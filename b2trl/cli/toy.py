"""`b2trl toy`: train a LoRA on the shipped toy world (offline, minutes on a CPU) and report held-out alignment
before and after."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .parsing import parse_training_command, training_fields, training_parser
from .train import arg


@dataclass
class ToyArguments:
    """The arguments of `b2trl toy` besides `B2DiffuRLConfig`'s and `IntervalSchedule`'s fields."""

    pretrained_model: str = arg("toy", "The toy model: 'toy' (Stable Diffusion, DDIM) or 'toy-sd3' (SD3, flow "
                                "matching), each with its own preset.", choices=["toy", "toy-sd3"])
    output_dir: str = arg("outputs/toy", "Where the LoRA, metrics, plots and the held-out report go.")
    heldout_seeds: int = arg(3, "Noise seeds per held-out prompt in the evaluation before and after training.")
    hub_model_id: Optional[str] = arg(None, "Repository id for --push_to_hub (default: the output folder's name).")
    branch_images: bool = arg(True, "Save a grid of each stage's branch groups with their rewards (and log it to "
                              "the tracker).")


DESCRIPTION = """Train B²-DiffuRL on b2trl's toy text-to-image world (coloured shapes, an exact alignment reward):
offline, about 2 minutes on two CPU cores. Evaluates held-out alignment before training and from the saved LoRA
after it, on the same noise, and writes the LoRA with its model card, metrics, a reward curve, branch grids and a
before/after grid. The toy preset sets the scale; any flag (or --config) overrides it."""

EPILOG = """examples:
  b2trl toy                                   # the README's job: 10 stages, 32 prompts x 2 branches
  b2trl toy --pretrained_model toy-sd3        # the flow-matching toy model with its own preset
  b2trl toy --method b2_pairs --num_epochs 30 # another method, longer
  b2trl eval --base toy --lora outputs/toy/lora --reward toy_alignment"""


HELP = dict(prog="b2trl toy", description=DESCRIPTION, epilog=EPILOG)


def build_parser():
    """The parser of `b2trl toy` (its defaults before a file or the preset)."""
    return training_parser(ToyArguments, **HELP)


def parse_args(argv=None):
    """`(ToyArguments, B2DiffuRLConfig, preset)` from the command line (and `--config`)."""
    from ..toy.main import preset_for

    return parse_training_command(argv, ToyArguments, **HELP, model_default="toy",
                                  preset_for=lambda model: {"exp_name": "toy", **preset_for(model)})


def main(argv=None) -> Optional[dict]:
    """Run `b2trl toy`; returns the run's summary on the main process."""
    from ..toy import train_prompts
    from ..toy.main import HeldOutEvaluation
    from .loading import build_reward, check_config_for_model, load_base_pipeline, start_processes
    from .run import run_training

    args, config, _ = parse_args(argv)
    state = start_processes(config)  # first: see start_processes
    os.makedirs(args.output_dir, exist_ok=True)
    config.project_kwargs.setdefault("project_dir", args.output_dir)
    if state.is_main_process:
        method = f", method {config.method}" if config.method else ""
        print(f"b2trl toy: model {args.pretrained_model}{method}, output {args.output_dir}, "
              f"{state.num_processes} process(es)")
    reward_fn = build_reward("toy_alignment", {})
    pipeline = load_base_pipeline(args.pretrained_model)
    check_config_for_model(config, pipeline, training_fields(ToyArguments))
    report = HeldOutEvaluation(args.pretrained_model, range(args.heldout_seeds))
    summary = {"preset": args.pretrained_model, "method": config.method}
    return run_training(
        state, config, pipeline, reward_name="toy_alignment", reward_fn=reward_fn, prompts=train_prompts(),
        output_dir=args.output_dir, report=report, base_model=args.pretrained_model, hub_model_id=args.hub_model_id,
        branch_images=args.branch_images, summary=summary,
    )
