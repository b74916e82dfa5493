"""Fine-tune a Stable Diffusion model with B²-DiffuRL.

With no flags it trains a LoRA on b2trl's shipped toy text-to-image world (offline, a few minutes on a CPU)
and reports held-out alignment before and after. On a GPU, point it at a real model and reward:

    accelerate launch examples/train_sd.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --reward clip_score --prompts_file prompts.txt --preset reference --log_with tensorboard

The model family (SD1.x, SDXL) is read from the model's model_index.json, so the same command trains SDXL:

    accelerate launch examples/train_sd.py --pretrained_model stabilityai/stable-diffusion-xl-base-1.0 \
        --reward pickscore --prompts_file prompts.txt --mixed_precision bf16 --gradient_checkpointing true \
        --rollout_chunk_size 8 --resolution 1024

For SDXL, the options that matter are --resolution (default: the model's own, 1024), --gradient_checkpointing
(training memory), --rollout_chunk_size (sampling memory), --use_8bit_adam (optimizer memory, full fine-tuning)
and --pretrained_vae (e.g. madebyollin/sdxl-vae-fp16-fix, to decode in fp16); see docs/sdxl.md.

Every B2DiffuRLConfig field (TRL's DDPOConfig plus branching, selection and the loss) and every IntervalSchedule
field is a flag; `--help` lists them. `--preset` picks the defaults those flags start from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from accelerate import PartialState
from transformers import HfArgumentParser

from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer, IntervalSchedule, load_pipeline
from b2trl.hub import build_model_card, push_folder, reward_evaluation, sample_for_card, save_samples
from b2trl.images import BranchGridHook, plot_reward_curve
from b2trl.metrics import MetricsWriter
from b2trl.prompts import ANIMAL_ACTIVITY_PROMPTS, PromptSourceError, load_prompts_dataset, read_prompts_file
from b2trl.toy import model_path as toy_model_path
from b2trl.toy import train_prompts
from b2trl.toy.report import evaluate_base, report_heldout

TOY = "toy"
# --pretrained_model names of the shipped toy models, and their kind for b2trl.toy.model_path
TOY_MODELS = {TOY: "sd", "toy-sd3": "sd3"}
# the model card's samples: a few prompts, each under the same seeds before and after training
CARD_PROMPTS, CARD_SEEDS = 2, [0, 1]

# Where the defaults start. "reference" is the paper's run (B2DiffuRLConfig's own defaults); "toy" scales it
# down so that the shipped toy world trains in minutes on two CPU cores.
PRESETS = {
    "reference": {},
    "toy": dict(
        # one pass of the backward schedule, the interval growing from the last 14 of 20 steps to all of them;
        # why not longer: docs/toy_world.md, "What RL changes on the toy world"
        num_epochs=10,
        # more prompts with fewer branches each: the study's choice for this budget (docs/study.md, `b2_n2`)
        sample_batch_size=32,
        sample_num_batches_per_epoch=1,
        num_branches=2,
        train_batch_size=8,
        train_gradient_accumulation_steps=1,
        train_learning_rate=1e-3,
        history_stages=4,
        initial_length=14,
        num_stages=10,
        mixed_precision="no",
        save_freq=0,  # a short job: no checkpoints, so rerunning into the same folder just works
    ),
}
# on top of "toy" for the flow-matching toy model (--pretrained_model toy-sd3): the interval anchored at the start
# (the first 14 of 20 steps, growing by one every ~4 stages, branches forking at the initial noise), 16 prompts x 4
# branches, a smaller step than the SD toy's. The one setting measured to raise this model's held-out alignment on
# all three training seeds (docs/flow_matching.md has the runs; longer runs lose the gain)
TOY_FLOW = dict(noise_level=0.7, train_learning_rate=3e-4, sample_batch_size=16, num_branches=4, num_stages=30,
                anchor="start")


def arg(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ScriptArguments:
    """Arguments of this script (the trainer's are B2DiffuRLConfig's and IntervalSchedule's)."""

    pretrained_model: str = arg(TOY, "Base pipeline: a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a "
                                "local diffusers folder, or 'toy' / 'toy-sd3' for b2trl's shipped toy models "
                                "(Stable Diffusion / SD3 flow matching).")
    pretrained_revision: str = arg("main", "Hub revision of --pretrained_model.")
    pretrained_vae: Optional[str] = arg(None, "A VAE to use instead of the model's own (Hub id or folder), e.g. "
                                        "madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.")
    use_lora: bool = arg(True, "Train a LoRA adapter (False: the whole UNet).")
    preset: str = arg("auto", "Defaults to start from: 'reference' (the paper's run), 'toy' (minutes on a CPU), or "
                      "'auto' ('toy' for the toy model, else 'reference'). Flags override the preset.",
                      choices=["auto", "reference", "toy"])
    prompts: Optional[list[str]] = arg(None, "Training prompts, given inline.")
    prompts_file: Optional[str] = arg(None, "A text file with one prompt per line.")
    prompts_dataset: Optional[str] = arg(None, "A `datasets` dataset to read prompts from: a Hub id, a local folder "
                                         "of data files, or a folder written by `save_to_disk`.")
    prompts_dataset_split: str = arg("train", "Split of --prompts_dataset.")
    prompts_dataset_column: str = arg("prompt", "Column of --prompts_dataset.")
    reward: str = arg("auto", "Reward name (toy_alignment, aesthetic, clip_score, pickscore, jpeg_compressibility, "
                      "jpeg_incompressibility) or 'module:function' for your own (importable, or in the working "
                      "directory); 'auto' = toy_alignment for the toy model, else aesthetic.")
    reward_model: Optional[str] = arg(None, "model_name_or_path of a CLIP-based reward (Hub id or local folder).")
    reward_kwargs: str = arg("{}", "JSON object of extra keyword arguments for the reward.")
    output_dir: str = arg("outputs/train_sd", "Where the LoRA, metrics and plots go.")
    eval_seeds: int = arg(3, "Toy model: seeds per held-out prompt in the evaluation.")
    hub_model_id: Optional[str] = arg(None, "Repo id for --push_to_hub (defaults to the output folder's name).")
    init_lora: Optional[str] = arg(None, "Start from these LoRA weights (a folder written by a previous run's "
                                   "save_pretrained).")
    branch_images: bool = arg(True, "Save a grid of each stage's branch groups with their rewards (and log it to "
                              "the tracker).")


def build_parser(preset: str, model: str = TOY) -> HfArgumentParser:
    parser = HfArgumentParser(
        (ScriptArguments, B2DiffuRLConfig, IntervalSchedule),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flow = TOY_FLOW if preset == "toy" and TOY_MODELS.get(model) == "sd3" else {}
    parser.set_defaults(**{**PRESETS[preset], **flow}, exp_name="train_sd")
    for action in parser._actions:
        # dict-valued fields (accelerator_kwargs, project_kwargs, tracker_kwargs, interval_schedule) take JSON
        if action.type in (dict, IntervalSchedule):
            action.type = json_object
    return parser


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"cpu\": true}}', got {text!r}")
    return value


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--pretrained_model", default=TOY)
    probe.add_argument("--preset", default="auto")
    known, _ = probe.parse_known_args(argv)
    preset = known.preset
    if preset == "auto":
        preset = "toy" if known.pretrained_model in TOY_MODELS else "reference"

    parser = build_parser(preset, known.pretrained_model)
    namespace = parser.parse_args(argv)

    def fields_of(cls) -> dict:
        return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}

    # The schedule is its own dataclass on the command line; the config must be built with it (not with its
    # default) so that its validation sees the schedule that will run.
    try:
        given = namespace.interval_schedule  # --interval_schedule '{...}' wins over the separate flags
        schedule = IntervalSchedule(**(given if isinstance(given, dict) else fields_of(IntervalSchedule)))
        config = B2DiffuRLConfig(**{**fields_of(B2DiffuRLConfig), "interval_schedule": schedule})
    except ValueError as err:
        parser.error(str(err))
    return ScriptArguments(**fields_of(ScriptArguments)), config, preset


def load_prompts(args: ScriptArguments, is_toy: bool) -> list[str]:
    sources = [s for s in (args.prompts, args.prompts_file, args.prompts_dataset) if s]
    if len(sources) > 1:
        raise SystemExit("error: give at most one of --prompts, --prompts_file, --prompts_dataset")
    try:
        if args.prompts_file:
            return read_prompts_file(args.prompts_file)
        if args.prompts_dataset:
            return load_prompts_dataset(args.prompts_dataset, args.prompts_dataset_split, args.prompts_dataset_column)
    except PromptSourceError as err:
        source = "--prompts_file" if args.prompts_file else "--prompts_dataset"
        flag = {"source": source, "split": "--prompts_dataset_split", "column": "--prompts_dataset_column"}[err.field]
        raise SystemExit(f"error: {flag} {err}") from None
    if args.prompts:
        return list(args.prompts)
    return train_prompts() if is_toy else list(ANIMAL_ACTIVITY_PROMPTS)


def build_reward(args: ScriptArguments, is_toy: bool):
    from b2trl.rewards import RewardModelNotFoundError, get_reward

    name = args.reward if args.reward != "auto" else ("toy_alignment" if is_toy else "aesthetic")
    if ":" in name and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # 'module:function' may name a module in the working directory
    try:
        kwargs = json_object(args.reward_kwargs)
    except argparse.ArgumentTypeError as err:
        raise SystemExit(f"error: --reward_kwargs: {err}") from None
    if args.reward_model:
        kwargs["model_name_or_path"] = args.reward_model
    try:
        return name, get_reward(name, **kwargs)
    except RewardModelNotFoundError as err:
        flag = "--reward_model" if args.reward_model else f"--reward {name}"
        raise SystemExit(
            f"error: {flag}: {err} (here --reward_model sets model_name_or_path, --reward_kwargs the others)"
        ) from None
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: --reward {name}: {err}") from None


def load_base_pipeline(args: ScriptArguments, is_toy: bool):
    model = toy_model_path(TOY_MODELS[args.pretrained_model]) if is_toy else args.pretrained_model
    try:
        return load_pipeline(
            model, revision=args.pretrained_revision, use_lora=args.use_lora, pretrained_vae=args.pretrained_vae
        )
    except (OSError, ValueError) as err:  # the Hub client's not-found errors are OSErrors
        flag = "--pretrained_vae" if str(err).startswith("pretrained_vae") else "--pretrained_model"
        value = args.pretrained_vae if flag == "--pretrained_vae" else args.pretrained_model
        raise SystemExit(f"error: {flag} {value}: {err}") from None


def start_processes(config: B2DiffuRLConfig) -> PartialState:
    """
    Create accelerate's process state from the config before anything else does: loading the pipeline would
    create a default one, which on a CPU-only machine is a single process however the script was launched.
    """
    state = PartialState(**({"cpu": True} if config.accelerator_kwargs.get("cpu") else {}))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise SystemExit(
            f"error: launched as {launched} processes (WORLD_SIZE={launched}) but accelerate set up each as a single "
            f"process, so they would train {launched} separate models. On a machine without GPUs pass "
            "--accelerator_kwargs '{\"cpu\": true}' (gloo on CPU); with GPUs, check that every process sees one."
        )
    return state


def make_prompt_fn(prompts: list[str], seed: int):
    rng = random.Random(seed)
    return lambda: (rng.choice(prompts), {})


def main(argv=None):
    args, config, preset = parse_args(argv)
    state = start_processes(config)  # first: see start_processes
    is_toy = args.pretrained_model in TOY_MODELS
    os.makedirs(args.output_dir, exist_ok=True)
    # checkpoints and tracker logs live beside the outputs unless the user points them elsewhere
    config.project_kwargs.setdefault("project_dir", args.output_dir)
    if state.is_main_process:
        print(f"b2trl: preset '{preset}', model {args.pretrained_model}, output {args.output_dir}, "
              f"{state.num_processes} process(es)")
    reward_name, reward_fn = build_reward(args, is_toy)
    prompts = load_prompts(args, is_toy)
    pipeline = load_base_pipeline(args, is_toy)

    # only the main process evaluates and samples for the model card; the others wait for it in the trainer
    seeds, base_eval, card_prompts, card_images = list(range(args.eval_seeds)), None, None, {}
    if state.is_main_process and is_toy:
        print(f"Evaluating the base model on held-out prompts ({args.eval_seeds} seeds)...")
        base_eval = evaluate_base(pipeline, seeds)
    elif state.is_main_process:
        card_prompts = list(dict.fromkeys(prompts))[:CARD_PROMPTS]
        card_images["base"] = sample_for_card(pipeline, card_prompts, CARD_SEEDS, config, state.device)

    hook = None
    if args.branch_images and state.is_main_process:  # every process would write the same file names
        hook = BranchGridHook(config.num_branches, output_dir=os.path.join(args.output_dir, "branches"))
    # each process draws its own prompts (one shared sequence would sample the same prompts on every process)
    prompt_fn = make_prompt_fn(prompts, config.seed + state.process_index)
    trainer = B2DiffuRLTrainer(config, reward_fn, prompt_fn, pipeline, hook)
    if args.init_lora:
        trainer.load_lora_weights(args.init_lora)
    metrics = None
    if state.is_main_process:
        metrics = MetricsWriter(args.output_dir, resume_stage=trainer.first_epoch if config.resume_from else None)
        trainer.stage_end_callbacks.append(metrics)
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start

    lora_dir = os.path.join(args.output_dir, "lora" if trainer.use_lora else "pipeline")
    card_kwargs = dict(base_model=args.pretrained_model, reward_name=reward_name, repo_id=args.hub_model_id)
    trainer.save_pretrained(lora_dir, **card_kwargs)
    # every process: flush the trackers and destroy the process group; the rest is single-process work
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if not state.is_main_process:
        return
    summary = {"preset": preset, "reward": reward_name, "train_seconds": round(train_seconds, 1), "saved": lora_dir}
    report = None
    if is_toy:
        print("Evaluating the trained model on held-out prompts...")
        # from the saved folder, as a user would load it: base + LoRA, or the saved full pipeline
        report = report_heldout(base_eval, lora_dir, use_lora=trainer.use_lora, output_dir=args.output_dir,
                                seeds=seeds, base_model=toy_model_path(TOY_MODELS[args.pretrained_model]))
        print(report.headline())
        summary.update(report.summary())
        card_prompts, card_seeds, card_images = report.card_samples(CARD_PROMPTS, len(CARD_SEEDS))
        evaluation = report.card_evaluation()
    else:
        card_seeds = CARD_SEEDS
        # a sharded denoiser runs only with every process taking part: sample the exported pipeline instead
        trained, device = trainer.sd_pipeline, None
        if trainer.sharding is not None:
            trained, device = load_pipeline(lora_dir, use_lora=False), state.device
        with trainer.accelerator.autocast():
            card_images["trained"] = sample_for_card(trained, card_prompts, card_seeds, config, device)
        label = f"reward `{reward_name}`, mean of the {len(card_prompts) * len(card_seeds)} samples above"
        evaluation = reward_evaluation(reward_fn, card_images, card_prompts, label, state.device)
    # the card shows what the run did: samples saved beside the weights (pushed with them) and the evaluation
    samples = save_samples(lora_dir, card_prompts, card_seeds, card_images)
    card = build_model_card(trainer, **card_kwargs, samples=samples, evaluation=evaluation)
    card.save(os.path.join(lora_dir, "README.md"))
    curve = plot_reward_curve(metrics.rows, os.path.join(args.output_dir, "reward_curve.png"),
                              heldout=report.curve_marks() if report else None)
    if curve:
        summary["reward_curve"] = curve
    if config.push_to_hub:
        url = push_folder(lora_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
        summary["hub_url"] = url
        print(f"Pushed to {url}")
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Done in {train_seconds:.0f} s of training. Outputs in {args.output_dir}")


if __name__ == "__main__":
    main()
