"""Exporting trained weights in diffusers' layout, and their model card."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

CITATION = """@inproceedings{hu2025towards,
  title     = {Towards Better Alignment: Training Diffusion Models with Reinforcement Learning Against Sparse Rewards},
  author    = {Hu, Zijing and Zhang, Fengda and Chen, Long and Kuang, Kun and Li, Jiahui and Gao, Kaifeng and
               Xiao, Jun and Wang, Xin and Zhu, Wenwu},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025},
  eprint    = {2503.11240},
  archivePrefix = {arXiv}
}"""

TAGS = ["lora", "b2-diffurl", "text-to-image", "trl", "diffusers", "reinforcement-learning"]


def save_trained(trainer, save_directory: str, denoiser_weights: Optional[dict] = None, **card_kwargs) -> None:
    """
    Write what `trainer` trained to `save_directory` (call on the main process): LoRA weights in diffusers' layout,
    or the whole pipeline after full fine-tuning, and the model card (`card_kwargs` go to [`build_model_card`]).
    The weights are whatever the denoiser holds now (the caller swaps the EMA weights in to save those), or
    `denoiser_weights`, the whole state dict of a sharded denoiser (gathered by every process beforehand).
    """
    os.makedirs(save_directory, exist_ok=True)
    if trainer.use_lora:
        trainer.family.save_lora(trainer.accelerator.unwrap_model(trainer.training_denoiser), save_directory)
    elif denoiser_weights is not None:
        from .sharding import save_pipeline_with

        save_pipeline_with(trainer.sd_pipeline.sd_pipeline, trainer.family.denoiser_name, denoiser_weights,
                           save_directory)
    else:
        trainer.sd_pipeline.sd_pipeline.save_pretrained(save_directory, safe_serialization=True)
    build_model_card(trainer, **card_kwargs).save(os.path.join(save_directory, "README.md"))


def push_trained(trainer, repo_id: str, *, token=None, private=None, commit_message: str = "", **card_kwargs):
    """Save what `trainer` trained into a temporary folder and upload it to `repo_id` (every process calls this;
    the main process uploads and gets the URL, the others `None`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        trainer.save_pretrained(folder, repo_id=repo_id, **card_kwargs)
        url = None
        if trainer.accelerator.is_main_process:
            url = push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)
        trainer.accelerator.wait_for_everyone()
    return url


def _toy_model(base: Optional[str]) -> Optional[str]:
    """The `model_path(...)` expression of a shipped toy model named or located by `base`, else `None`."""
    from .toy import toy_model_kind

    kind = toy_model_kind(base)
    if kind is None:
        return None
    return "model_path()" if kind == "sd" else f'model_path("{kind}")'


def _base_model(trainer) -> Optional[str]:
    base = getattr(trainer.sd_pipeline, "pretrained_model", None)
    return base if isinstance(base, str) else None


def _reward_name(reward_fn) -> str:
    name = getattr(reward_fn, "name", None) or getattr(reward_fn, "__qualname__", None)
    return name or type(reward_fn).__name__


def _pipeline_class_name(trainer) -> str:
    family = getattr(trainer.sd_pipeline, "family", None)
    return getattr(family, "pipeline_class_name", None) or "StableDiffusionPipeline"


def save_samples(
    save_directory: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    images: Mapping[str, Any],
    subfolder: str = "samples",
    min_size: int = 128,
) -> list[dict]:
    """
    Save sample images beside exported weights (so that they are pushed with them) for [`build_model_card`].

    Args:
        save_directory (`str`): the export folder (what `trainer.save_pretrained` wrote).
        prompts (`Sequence[str]`): the prompts, one per column of the images.
        seeds (`Sequence[int]`): the seeds, one per row of the images.
        images (`Mapping[str, torch.Tensor]`): per model (e.g. ``"base"``, ``"trained"``), a tensor
            ``(len(seeds), len(prompts), 3, H, W)`` in [0, 1].
        subfolder (`str`, *optional*, defaults to `"samples"`): where the PNGs go inside `save_directory`.
        min_size (`int`, *optional*, defaults to `128`): smaller images are enlarged (nearest neighbour) to at
            least this size, so that a model card shows them at a readable size.

    Returns:
        `list[dict]`: one record per image, with ``model``, ``prompt``, ``seed`` and ``path`` (relative to
        `save_directory`).
    """
    import torch
    from PIL import Image

    os.makedirs(os.path.join(save_directory, subfolder), exist_ok=True)
    records = []
    for model, batch in images.items():
        batch = torch.as_tensor(batch).detach().float().cpu().clamp(0, 1)
        if tuple(batch.shape[:2]) != (len(seeds), len(prompts)):
            raise ValueError(
                f"save_samples: images[{model!r}] has shape {tuple(batch.shape)}; expected "
                f"({len(seeds)}, {len(prompts)}, 3, H, W) for {len(seeds)} seeds and {len(prompts)} prompts."
            )
        for i, seed in enumerate(seeds):
            for j, prompt in enumerate(prompts):
                tile = (batch[i, j] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                picture = Image.fromarray(tile)
                factor = -(-min_size // max(picture.size))  # ceil: never shrink
                if factor > 1:
                    picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
                path = f"{subfolder}/{model}_{j}_seed{seed}.png"
                picture.save(os.path.join(save_directory, path))
                records.append({"model": model, "prompt": prompt, "seed": int(seed), "path": path})
    return records


def sample_for_card(pipeline, prompts: Sequence[str], seeds: Sequence[int], config, device=None):
    """
    A few images with fixed seeds for the model card, sampled as the run's rollout samples (its resolution, steps,
    eta, and its model family's guidance: classifier-free guidance only with `train_cfg`, FLUX.1's embedded guidance
    always). Call it before and after training for a comparison on the same noise.

    Args:
        pipeline: a diffusers pipeline or a training pipeline holding one as ``sd_pipeline``.
        prompts (`Sequence[str]`): the prompts.
        seeds (`Sequence[int]`): one image per prompt and seed.
        config ([`B2DiffuRLConfig`]): the run's configuration.
        device (`torch.device`, *optional*): where to sample (the pipeline is moved there).

    Returns:
        `torch.Tensor` ``(len(seeds), len(prompts), 3, H, W)`` in [0, 1], on the CPU.
    """
    from .images import generate_images
    from .models import family_for_pipeline

    pipe = getattr(pipeline, "sd_pipeline", pipeline)
    if device is not None:
        pipe.to(device)
    family = family_for_pipeline(pipeline)
    # at the training resolution: a pipeline's own default can differ (Z-Image's is always 1024 px)
    height, width = family.image_size(pipe, getattr(config, "resolution", None))
    return generate_images(
        pipeline, prompts, seeds, num_inference_steps=config.sample_num_steps, eta=config.sample_eta,
        height=height, width=width, **family.guidance_call_kwargs(config),
    )


def _size_kwargs(config) -> dict:
    """The pipeline call's image size when the run trained at a `resolution` other than the model's own."""
    size = getattr(config, "resolution", None)
    return {} if size is None else {"height": size, "width": size}


def reward_evaluation(reward_fn, images: Mapping[str, Any], prompts: Sequence[str], label: str, device=None) -> dict:
    """
    The reward's mean over each model's ``(seeds, prompts, 3, H, W)`` images, as a row of [`build_model_card`]'s
    evaluation table: ``{label: {model: mean}}``.
    """
    import torch

    row = {}
    for model, batch in images.items():
        flat = torch.as_tensor(batch).reshape(-1, *batch.shape[2:])
        flat = flat.to(device) if device is not None else flat
        rewards, _ = reward_fn(flat, list(prompts) * batch.shape[0], [{}] * flat.shape[0])
        row[model] = float(torch.as_tensor(rewards, dtype=torch.float32).mean())
    return {label: row}


def _samples_section(samples: Sequence[Mapping]) -> str:
    columns = list(dict.fromkeys((s["model"], s["seed"]) for s in samples))
    prompts = list(dict.fromkeys(s["prompt"] for s in samples))
    path = {(s["prompt"], s["model"], s["seed"]): s["path"] for s in samples}
    lines = [
        "## Samples",
        "",
        "A seed is the same starting noise for every model, so columns with the same seed compare the models on "
        "equal terms.",
        "",
        "| prompt | " + " | ".join(f"{model} · seed {seed}" for model, seed in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for prompt in prompts:
        cells = [f"![{model}, seed {seed}]({path[prompt, model, seed]})" if (prompt, model, seed) in path else ""
                 for model, seed in columns]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _evaluation_section(evaluation: Mapping[str, Mapping[str, float]]) -> str:
    models = list(dict.fromkeys(m for row in evaluation.values() for m in row))
    show_change = models == ["base", "trained"]
    header = "| | " + " | ".join(models) + (" | change |" if show_change else " |")
    lines = ["## Evaluation", "", header, "| --- |" + " ---: |" * (len(models) + show_change)]
    for label, row in evaluation.items():
        cells = [f"{row[m]:.3f}" if m in row else "" for m in models]
        if show_change:
            cells.append(f"{row['trained'] - row['base']:+.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_model_card(
    trainer,
    *,
    base_model: Optional[str] = None,
    reward_name: Optional[str] = None,
    repo_id: Optional[str] = None,
    extra_text: str = "",
    samples: Optional[Sequence[Mapping]] = None,
    evaluation: Optional[Mapping[str, Mapping[str, float]]] = None,
    ema: bool = False,
):
    """
    A `huggingface_hub.ModelCard` describing a B²-DiffuRL run: base model, reward, interval schedule, stages
    trained, final mean reward, sample images and evaluation when given, how to load the weights, and the paper.

    Args:
        trainer ([`B2DiffuRLTrainer`]): the trainer after training.
        base_model (`str`, *optional*): the base model's name; defaults to the pipeline's `pretrained_model`.
        reward_name (`str`, *optional*): a readable reward name; defaults to the reward's `name` or function name.
        repo_id (`str`, *optional*): the repository id the usage snippet loads from.
        extra_text (`str`, *optional*, defaults to `""`): markdown added before the citation.
        samples (`Sequence[Mapping]`, *optional*): images saved beside the weights, as [`save_samples`] returns
            them (``model``, ``prompt``, ``seed``, ``path``); shown as a table, one column per model and seed, and
            the trained model's images become the Hub widget's examples.
        evaluation (`Mapping[str, Mapping[str, float]]`, *optional*): ``{measure: {model: value}}``, e.g.
            ``{"held-out alignment": {"base": 0.865, "trained": 0.896}}``; shown as a table (with the change when
            the models are ``base`` and ``trained``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = trainer.config
    base = base_model or _base_model(trainer)
    toy_expr = _toy_model(base)
    is_toy = toy_expr is not None
    hub_base = base if base and not is_toy and not os.path.isdir(base) else None
    if is_toy:
        base, base_expr, base_import = f"b2trl toy model ({toy_expr})", toy_expr, "from b2trl.toy import model_path\n"
    elif base and hub_base is None:
        # a local folder: its name only, never this machine's path
        base, base_expr, base_import = os.path.basename(os.path.normpath(base)), '"path/to/base/model"', ""
    else:
        base_expr, base_import = f'"{base or "BASE_MODEL"}"', ""
    reward = reward_name or _reward_name(trainer.reward_fn)
    stats = getattr(trainer, "last_stage_stats", None) or {}
    stages = stats.get("stage", -1) + 1
    schedule = config.interval_schedule
    pipeline_class = _pipeline_class_name(trainer)
    family = getattr(trainer, "family", None)
    family_tags = list(getattr(family, "hub_tags", ("stable-diffusion",)))
    vae = getattr(trainer.sd_pipeline, "pretrained_vae", None)
    vae = os.path.basename(os.path.normpath(vae)) if vae and os.path.isdir(vae) else vae  # never a local path
    samples = list(samples or [])
    trained_samples = [s for s in samples if s["model"] == "trained"]
    data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        tags=TAGS + family_tags + ([] if trainer.use_lora else ["full-fine-tune"]),
        pipeline_tag="text-to-image",
        # what the Hub shows as the model's examples (diffusers' training scripts fill it the same way)
        widget=[{"text": s["prompt"], "output": {"url": s["path"]}} for s in trained_samples] or None,
    )
    here = repo_id or "path/to/this/folder"
    imports = pipeline_class + (", AutoencoderKL" if vae else "")
    vae_line, vae_arg = (f'vae = AutoencoderKL.from_pretrained("{vae}")\n', ", vae=vae") if vae else ("", "")
    if trainer.use_lora:
        load = (f'{base_import}{vae_line}pipe = {pipeline_class}.from_pretrained({base_expr}{vae_arg})\n'
                f'pipe.load_lora_weights("{here}")')
    else:
        load = f'{vae_line}pipe = {pipeline_class}.from_pretrained("{here}"{vae_arg})'
    # what the pipeline needs to sample as the model was trained (its guidance under the pipeline's names, a flow
    # model's text length, the training resolution), eta left at default
    call_kwargs = {} if family is None else {
        **family.guidance_call_kwargs(config), **family.pipeline_call_kwargs(trainer.sd_pipeline.sd_pipeline),
        **_size_kwargs(config),
    }
    call_extra = "".join(f", {k}={v!r}" for k, v in call_kwargs.items() if k != "eta" and v is not None)
    sampler = getattr(trainer, "sampler", None)
    sampling = sampler.describe() if sampler is not None else f"DDIM, eta {config.sample_eta}"
    loss_fn = getattr(trainer, "loss_fn", None)
    loss = loss_fn.describe() if loss_fn is not None else f"PPO clip {config.train_clip_range}"
    if getattr(config, "kl_coef", 0):
        loss += f", KL to the base model x {config.kl_coef}"
    if samples:
        example_prompt = samples[0]["prompt"]
    else:
        example_prompt = "a red circle left of a blue square" if is_toy else "a cat riding a bike"

    final_reward = f"{stats['reward_mean']:.4f}" if "reward_mean" in stats else "n/a"
    sections = "".join("\n" + part for part in (
        _samples_section(samples) if samples else "",
        _evaluation_section(evaluation) if evaluation else "",
    ) if part)
    text = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1] if repo_id else "B²-DiffuRL fine-tune"}

{"A LoRA adapter" if trainer.use_lora else "A fully fine-tuned pipeline"} for `{base or "a " + pipeline_class + " model"}`,
trained with b2trl (reinforcement learning over branch rollouts, the trainer of B²-DiffuRL,
arXiv 2503.11240) against the reward `{reward}`.

| | |
| --- | --- |
| base model | `{base or "n/a"}` |
| reward | `{reward}` |
| stages trained | {stages} |
| final stage mean reward | {final_reward} |
| interval schedule | {_schedule_line(schedule)} |
| model family | {family.name if family is not None else "sd"} (`{pipeline_class}`) |
{f"| VAE | `{vae}` |" + chr(10) if vae else ""}| sampling | {config.sample_num_steps} steps, {sampling}, guidance {config.sample_guidance_scale} |
| method | {_method_line(config)} |
| branches per prompt | {config.num_branches}{" (each from its own initial noise)" if getattr(config, "independent_noise", False) else ""} |
| advantages | {_rule_line(config)} |
{f"| weights | exponential moving average of the trained weights, decay {config.ema_decay} every {config.ema_update_every} optimizer steps |" + chr(10) if ema else ""}| optimisation | lr {config.train_learning_rate}, {loss}, {config.train_num_inner_epochs} passes over the kept samples per stage |
{sections}
## Usage

```python
from diffusers import {imports}

{load}
image = pipe("{example_prompt}", num_inference_steps={config.sample_num_steps}{call_extra}).images[0]
```
{extra_text}
## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(text)


def _schedule_line(schedule) -> str:
    if schedule.anchor in ("sliding", "random"):
        window = f"window of {schedule.initial_length} steps, anchor={schedule.anchor}"
        if schedule.anchor == "sliding":
            window += f", moving every {schedule.shift_every} stages"
        return window + (f", starting at most at step {schedule.window_max_start}"
                         if schedule.window_max_start is not None else "")
    return (f"initial_length={schedule.initial_length}, num_stages={schedule.num_stages}, "
            f"milestones={schedule.milestones}, anchor={schedule.anchor}")


def _method_line(config) -> str:
    method = getattr(config, "method", None)
    return f"`{method}` (b2trl.list_methods())" if method else "custom settings"


def _rule_line(config) -> str:
    rule = getattr(config, "effective_selection_rule", getattr(config, "selection_rule", "best_worst"))
    if rule == "grpo":
        return f"`grpo`, {getattr(config, 'advantage_std', 'group')} std"
    if rule in ("best_worst", "pairs"):
        return (f"`{rule}`, per-prompt z-scores over {config.history_stages} previous stages, thresholds "
                f"{config.selection_threshold_best} / {config.selection_threshold_worst}")
    return f"`{rule}`"


def push_folder(
    folder: str,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload B²-DiffuRL weights",
) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    return str(url)
