"""`b2trl eval`: score a base model and fine-tunes of it on the same prompts and the same noise, with one or more
rewards; print a table, write ``eval.json`` and a labelled grid."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from . import parsing
from .errors import fail, name_the_flag
from .train import arg


@dataclass
class EvalArguments:
    """The arguments of `b2trl eval`."""

    base: Optional[str] = arg(None, "The base model (required): 'toy' / 'toy-sd3', a Hub id, or a diffusers folder "
                              "(a full fine-tune saved by b2trl train is one). Scored as the first column.")
    lora: Optional[list[str]] = arg(None, "LoRA folders to score on top of --base, one column each: a folder "
                                    "trainer.save_pretrained wrote (lora/, or lora_ema/ for the EMA weights) or a "
                                    "run's output folder holding lora/.")
    pipelines: Optional[list[str]] = arg(None, "Further full pipeline folders to score, one column each.")
    labels: Optional[list[str]] = arg(None, "Column names: one for --base, then one per --lora and --pipelines "
                                      "(default: 'base' and the folders' names).")
    prompts: Optional[list[str]] = arg(None, "Prompts, given inline.")
    prompts_file: Optional[str] = arg(None, "A text file with one prompt per line.")
    prompts_dataset: Optional[str] = arg(None, "A `datasets` dataset to read prompts from (Hub id, folder of data "
                                         "files, or a folder written by `save_to_disk`).")
    prompts_dataset_split: str = arg("train", "Split of --prompts_dataset.")
    prompts_dataset_column: str = arg("prompt", "Column of --prompts_dataset.")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "Noise seeds: every model samples each prompt once per seed, from the same starting noise."})
    reward: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "help": "One or more rewards (registered names or 'module:function'); 'auto': toy_alignment for a toy "
        "model, else aesthetic. Several show whether a gain on one is a loss on another."})
    reward_kwargs: str = arg("{}", "JSON object of keyword arguments for every reward, or keyed by reward name "
                             "('{\"clip_score\": {\"model_name_or_path\": \"/models/clip\"}}').", metavar="JSON")
    num_inference_steps: int = arg(20, "Denoising steps.")
    guidance_scale: float = arg(5.0, "Classifier-free guidance scale (FLUX.1-dev: its embedded guidance).")
    eta: float = arg(1.0, "DDIM eta (DDIM models; flow models sample their ODE).")
    resolution: Optional[int] = arg(None, "Image height and width in pixels (default: the model's own).")
    negative_prompt: Optional[str] = arg(None, "Negative prompt of classifier-free guidance.")
    batch_size: int = arg(16, "Prompts per pipeline call (and images per reward call).")
    mixed_precision: str = arg("no", "Weights' dtype: 'no' (float32), 'fp16' or 'bf16'.",
                               choices=["no", "fp16", "bf16"])
    device: Optional[str] = arg(None, "Where to sample and score (default: cuda if available, else cpu).")
    output_dir: str = arg("outputs/eval", "Where eval.json and eval_grid.png go.")
    grid_prompts: int = arg(8, "Prompts shown in the grid (one row each, a column per model and seed).")


DESCRIPTION = """Score a base model and fine-tunes of it (LoRA, EMA LoRA, full pipelines) on the same prompts under
the same noise seeds, with one or more rewards, sampled as training samples (the family's scheduler: DDIM with
--eta for SD1.x/SDXL, the flow ODE for flow models). Prints a table (reward x model: the mean, and the spread of the
per-seed means), writes eval.json (per seed and per prompt) and eval_grid.png (rows: prompts; columns: model and
seed; each image with its first reward's score)."""

EPILOG = """examples:
  b2trl eval --base toy --lora outputs/toy/lora --reward toy_alignment jpeg_compressibility
  b2trl eval --base stable-diffusion-v1-5/stable-diffusion-v1-5 --lora run/lora run/lora_ema \\
      --prompts_file heldout.txt --reward clip_score aesthetic --mixed_precision fp16"""


def build_parser():
    """The parser of `b2trl eval`."""
    return parsing.build_parser((EvalArguments,), prog="b2trl eval", description=DESCRIPTION, epilog=EPILOG,
                                config_file=False, usage="b2trl eval --base MODEL [--lora DIR ...] [--FLAG VALUE ...]")


def parse_args(argv=None) -> EvalArguments:
    (args,) = build_parser().parse_args_into_dataclasses(args=argv)
    if not args.base:
        fail("--base is required: 'toy' / 'toy-sd3', a Hub id or a diffusers folder")
    return args


def lora_folder(folder: str) -> str:
    """The folder holding b2trl's LoRA file: `folder` itself, or the ``lora/`` of a run's output folder."""
    from ..models.base import LORA_FILE

    for candidate in (folder, os.path.join(folder, "lora")):
        if os.path.isfile(os.path.join(candidate, LORA_FILE)):
            return candidate
    fail(f"--lora {folder}: no {LORA_FILE} there (nor in its lora/); pass a folder that b2trl train or "
         "trainer.save_pretrained wrote")


def column_labels(args: EvalArguments) -> list[str]:
    names = ["base"] + [os.path.basename(os.path.normpath(p)) for p in (args.lora or []) + (args.pipelines or [])]
    if args.labels:
        if len(args.labels) != len(names):
            fail(f"--labels: {len(args.labels)} given for {len(names)} models (--base, then each --lora and "
                 "--pipelines)")
        names = list(args.labels)
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # 'lora' twice (two runs' lora/ folders) becomes lora, lora_2
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def load(model: str, flag: str, args: EvalArguments, dtype, device):
    """
    A diffusers pipeline from a toy name, Hub id or folder, set up to sample as training samples (its family's
    scheduler, no safety checker) on `device`; a model that cannot be loaded or sampled at `--resolution` stops the
    command with one line naming the flag.
    """
    from diffusers import DiffusionPipeline

    from ..models import family_for_pipeline
    from ..quiet import hide_known_warnings
    from .loading import model_folder

    try:
        pipe = DiffusionPipeline.from_pretrained(model_folder(model))
        family = family_for_pipeline(pipe)
    except (OSError, ValueError) as err:
        fail(f"{flag} {model}: {' '.join(str(err).split())}")
    try:
        family.image_size(pipe, args.resolution)
    except ValueError as err:
        fail(name_the_flag(str(err), ["resolution"]))
    family.prepare(pipe, use_lora=True)
    pipe.set_progress_bar_config(disable=True)
    with hide_known_warnings():
        return pipe.to(device) if dtype is None else pipe.to(device, dtype)


def sample(pipe, prompts, args: EvalArguments):
    """``(seeds, prompts, 3, H, W)`` images, each (prompt, seed) from its own fixed noise."""
    from types import SimpleNamespace

    from ..images import generate_images
    from ..models import family_for_pipeline

    family = family_for_pipeline(pipe)
    settings = SimpleNamespace(train_cfg=True, sample_guidance_scale=args.guidance_scale,
                               negative_prompts=args.negative_prompt)
    height, width = family.image_size(pipe, args.resolution)
    return generate_images(pipe, prompts, args.seeds, num_inference_steps=args.num_inference_steps, eta=args.eta,
                           batch_size=args.batch_size, height=height, width=width,
                           **family.guidance_call_kwargs(settings))


def score(reward_fn, images, prompts, batch_size: int, device):
    """The reward of every image, ``(seeds, prompts)``."""
    import torch

    seeds, count = images.shape[:2]
    flat, texts = images.reshape(seeds * count, *images.shape[2:]), list(prompts) * seeds
    values = []
    for start in range(0, len(texts), batch_size):
        rewards, _ = reward_fn(flat[start:start + batch_size].to(device), texts[start:start + batch_size],
                               [{}] * len(texts[start:start + batch_size]))
        values.append(torch.as_tensor(rewards, dtype=torch.float32).reshape(-1).cpu())
    return torch.cat(values).reshape(seeds, count)


def summarize(rewards, prompts) -> dict:
    per_seed = rewards.mean(dim=1)
    return {"mean": float(rewards.mean()), "seed_std": float(per_seed.std()) if len(per_seed) > 1 else 0.0,
            "per_seed": per_seed.tolist(), "per_prompt": dict(zip(prompts, rewards.mean(dim=0).tolist()))}


def table(results: dict, labels: list[str]) -> str:
    """Reward × model: the mean ± the std of the per-seed means."""
    rows = [["reward", *labels]]
    for reward, by_model in results.items():
        rows.append([reward, *(f"{by_model[m]['mean']:.4f} ± {by_model[m]['seed_std']:.4f}" for m in labels)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_grid(images: dict, rewards: dict, prompts, args: EvalArguments, path: str) -> str:
    import torch
    import torch.nn.functional as F

    from ..images import image_grid

    shown = min(args.grid_prompts, len(prompts))
    size = next(iter(images.values())).shape[-2:]
    tiles, labels, columns = [], [], [f"{m}\nseed {s}" for m in images for s in args.seeds]
    for p in range(shown):
        for model, batch in images.items():
            row = batch[:, p]
            tiles.append(row if row.shape[-2:] == size else F.interpolate(row, size=tuple(size), mode="nearest"))
            labels += [f"{v:.3f}" for v in rewards[model][:, p].tolist()]
    image_grid(torch.cat(tiles), nrow=len(columns), row_labels=prompts[:shown], tile_labels=labels,
               column_labels=columns).save(path)
    return path


def main(argv=None) -> dict:
    """Run `b2trl eval`; returns what it wrote to ``eval.json``."""
    import torch

    from ..prompts import ANIMAL_ACTIVITY_PROMPTS
    from ..quiet import hide_known_warnings
    from ..toy import TOY_MODELS, heldout_prompts
    from .loading import build_reward, read_prompts, reward_kwargs_for

    args = parse_args(argv)
    is_toy = args.base in TOY_MODELS
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    names = ["toy_alignment" if r == "auto" and is_toy else "aesthetic" if r == "auto" else r for r in args.reward]
    names = list(dict.fromkeys(names))
    kwargs = reward_kwargs_for(names, args.reward_kwargs)
    reward_fns = {name: build_reward(name, kwargs[name]) for name in names}
    default_prompts = heldout_prompts() if is_toy else ANIMAL_ACTIVITY_PROMPTS
    prompts = read_prompts(args.prompts, args.prompts_file, args.prompts_dataset, args.prompts_dataset_split,
                           args.prompts_dataset_column, default=default_prompts)
    loras = [lora_folder(folder) for folder in args.lora or []]
    labels = column_labels(args)
    os.makedirs(args.output_dir, exist_ok=True)

    images, sources = {}, {}
    pipe = load(args.base, "--base", args, dtype, device)
    print(f"b2trl eval: {len(prompts)} prompts x {len(args.seeds)} seeds, {len(labels)} model(s), rewards "
          f"{', '.join(names)}")
    images[labels[0]], sources[labels[0]] = sample(pipe, prompts, args), {"model": args.base}
    for label, folder in zip(labels[1:], loras):
        with hide_known_warnings(pipe):
            pipe.load_lora_weights(folder)
        images[label], sources[label] = sample(pipe, prompts, args), {"model": args.base, "lora": folder}
        pipe.unload_lora_weights()
    del pipe
    for label, folder in zip(labels[1 + len(loras):], args.pipelines or []):
        images[label], sources[label] = sample(load(folder, "--pipelines", args, dtype, device), prompts, args), {
            "model": folder}

    rewards = {name: {label: score(fn, batch, prompts, args.batch_size, device) for label, batch in images.items()}
               for name, fn in reward_fns.items()}
    results = {name: {label: summarize(values, prompts) for label, values in by_model.items()}
               for name, by_model in rewards.items()}
    print(table(results, labels))
    grid = write_grid(images, rewards[names[0]], prompts, args, os.path.join(args.output_dir, "eval_grid.png"))
    written = {"models": sources, "prompts": prompts, "seeds": list(args.seeds), "rewards": results, "grid": grid,
               "settings": {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                            if f.name in ("num_inference_steps", "guidance_scale", "eta", "resolution",
                                          "negative_prompt", "mixed_precision")}}
    with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
        json.dump(written, f, indent=2)
    print(f"Wrote {os.path.join(args.output_dir, 'eval.json')} and {grid}")
    return written
