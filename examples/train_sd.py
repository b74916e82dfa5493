"""Fine-tune a text-to-image diffusion model with B²-DiffuRL: the recipe, top to bottom, to copy and change.

    accelerate launch examples/train_sd.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --reward clip_score --prompts_file prompts.txt --log_with tensorboard

It takes `b2trl train`'s flags: every B2DiffuRLConfig and IntervalSchedule field, `--method NAME` to start from a
named method, `--config run.yaml` to read them from a file (`--help` lists them). The family (SD1.x, SDXL, SD3,
FLUX.1, Qwen-Image, Z-Image) is read from the model's model_index.json. `b2trl train` runs this same recipe and adds
what a product needs around it: metrics files, model-card samples, a reward curve, one-line errors. `b2trl toy` is
the offline demo on b2trl's toy world.
"""

import json
import os
import random

from accelerate import PartialState

from b2trl import B2DiffuRLTrainer, load_pipeline
from b2trl.cli.train import parse_args
from b2trl.prompts import ANIMAL_ACTIVITY_PROMPTS, load_prompts_dataset, read_prompts_file
from b2trl.rewards import get_reward
from b2trl.toy import TOY_MODELS, model_path, train_prompts


def main(argv=None):
    # 1. Parse: the script's arguments and the trainer's configuration (defaults < --method < --config < flags).
    args, config = parse_args(argv)
    # Create the process state first: on CPUs, torchrun's processes train one model only with gloo (cpu=True).
    state = PartialState(cpu=bool(config.accelerator_kwargs.get("cpu")))
    config.project_kwargs.setdefault("project_dir", args.output_dir)  # checkpoints and logs beside the weights

    # 2. Load the model: a Hub id, a diffusers folder, or one of b2trl's toy models ("toy", "toy-sd3").
    is_toy = args.pretrained_model in TOY_MODELS
    model = model_path(TOY_MODELS[args.pretrained_model]) if is_toy else args.pretrained_model
    pipeline = load_pipeline(model, revision=args.pretrained_revision, use_lora=args.use_lora,
                             pretrained_vae=args.pretrained_vae)

    # 3. The reward: any (images, prompts, metadata) -> (rewards, metadata); here a name b2trl knows or
    #    "module:function" for your own.
    reward_name = args.reward if args.reward != "auto" else ("toy_alignment" if is_toy else "aesthetic")
    reward_kwargs = json.loads(args.reward_kwargs)
    if args.reward_model:
        reward_kwargs["model_name_or_path"] = args.reward_model
    reward_fn = get_reward(reward_name, **reward_kwargs)

    # 4. The prompts, drawn at random; each process draws its own.
    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file)
    elif args.prompts_dataset:
        prompts = load_prompts_dataset(args.prompts_dataset, args.prompts_dataset_split, args.prompts_dataset_column)
    else:
        prompts = args.prompts or (train_prompts() if is_toy else list(ANIMAL_ACTIVITY_PROMPTS))
    rng = random.Random(config.seed + state.process_index)

    def prompt_fn():
        return rng.choice(prompts), {}

    # 5. The trainer: TRL's DDPOTrainer interface (config, reward, prompts, pipeline).
    trainer = B2DiffuRLTrainer(config, reward_fn, prompt_fn, pipeline)
    if args.init_lora:
        trainer.load_lora_weights(args.init_lora)

    # 6. Train: config.num_epochs stages; resume_from="latest" continues from the last checkpoint.
    trainer.train()

    # 7. Save in diffusers' layout with a model card: pipe.load_lora_weights(folder) loads it. With ema_decay > 0,
    #    the moving average too.
    card = dict(base_model=args.pretrained_model, reward_name=reward_name, repo_id=args.hub_model_id)
    saved = trainer.save_pretrained(os.path.join(args.output_dir, "lora" if trainer.use_lora else "pipeline"), **card)
    if trainer.ema is not None:
        trainer.save_pretrained(saved + "_ema", ema=True, **card)

    # 8. Push to the Hub.
    if config.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        url = trainer.push_to_hub(repo_id, base_model=args.pretrained_model, reward_name=reward_name)
        if state.is_main_process:
            print(f"Pushed to {url}")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
