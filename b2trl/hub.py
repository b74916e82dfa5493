"""Exporting trained weights in diffusers' layout, and their model card."""

from __future__ import annotations

import os
from typing import Optional

CITATION = """@inproceedings{hu2025towards,
  title     = {Towards Better Alignment: Training Diffusion Models with Reinforcement Learning Against Sparse Rewards},
  author    = {Hu, Zijing and Zhang, Fengda and Chen, Long and Kuang, Kun and Li, Jiahui and Gao, Kaifeng and
               Xiao, Jun and Wang, Xin and Zhu, Wenwu},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025},
  eprint    = {2503.11240},
  archivePrefix = {arXiv}
}"""

TAGS = ["lora", "b2-diffurl", "text-to-image", "trl", "diffusers", "stable-diffusion", "reinforcement-learning"]


def save_trained_weights(ddpo_pipeline, unet, save_directory: str, *, use_lora: bool) -> None:
    """Write a LoRA (diffusers key layout) or, for full fine-tuning, the whole pipeline to `save_directory`."""
    os.makedirs(save_directory, exist_ok=True)
    pipe = ddpo_pipeline.sd_pipeline
    if use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        type(pipe).save_lora_weights(save_directory, unet_lora_layers=layers, safe_serialization=True)
    else:
        pipe.save_pretrained(save_directory, safe_serialization=True)


def _toy_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "model")


def _base_model(trainer) -> Optional[str]:
    base = getattr(trainer.sd_pipeline, "pretrained_model", None)
    return base if isinstance(base, str) else None


def _reward_name(reward_fn) -> str:
    name = getattr(reward_fn, "name", None) or getattr(reward_fn, "__qualname__", None)
    return name or type(reward_fn).__name__


def build_model_card(
    trainer,
    *,
    base_model: Optional[str] = None,
    reward_name: Optional[str] = None,
    repo_id: Optional[str] = None,
    extra_text: str = "",
):
    """
    A `huggingface_hub.ModelCard` describing a B²-DiffuRL run: base model, reward, interval schedule, stages
    trained, final mean reward, how to load the weights, and the paper.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = trainer.config
    base = base_model or _base_model(trainer)
    is_toy = base == "toy" or (base is not None and os.path.realpath(base) == os.path.realpath(_toy_model_path()))
    hub_base = base if base and not is_toy and not os.path.isdir(base) else None
    if is_toy:
        base, base_expr, base_import = "b2trl toy model", "model_path()", "from b2trl.toy import model_path\n"
    elif base and hub_base is None:
        # a local folder: its name only, never this machine's path
        base, base_expr, base_import = os.path.basename(os.path.normpath(base)), '"path/to/base/model"', ""
    else:
        base_expr, base_import = f'"{base or "BASE_MODEL"}"', ""
    reward = reward_name or _reward_name(trainer.reward_fn)
    stats = getattr(trainer, "last_stage_stats", None) or {}
    stages = stats.get("stage", -1) + 1
    schedule = config.interval_schedule
    data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        tags=TAGS + ([] if trainer.use_lora else ["full-fine-tune"]),
        pipeline_tag="text-to-image",
    )
    here = repo_id or "path/to/this/folder"
    if trainer.use_lora:
        load = f'{base_import}pipe = StableDiffusionPipeline.from_pretrained({base_expr})\npipe.load_lora_weights("{here}")'
    else:
        load = f'pipe = StableDiffusionPipeline.from_pretrained("{here}")'

    final_reward = f"{stats['reward_mean']:.4f}" if "reward_mean" in stats else "n/a"
    text = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1] if repo_id else "B²-DiffuRL fine-tune"}

{"A LoRA adapter" if trainer.use_lora else "A fully fine-tuned pipeline"} for `{base or "a Stable Diffusion model"}`,
trained with b2trl's B²-DiffuRL trainer (backward progressive training
and branch-based sampling, arXiv 2503.11240) against the reward `{reward}`.

| | |
| --- | --- |
| base model | `{base or "n/a"}` |
| reward | `{reward}` |
| stages trained | {stages} |
| final stage mean reward | {final_reward} |
| interval schedule | initial_length={schedule.initial_length}, num_stages={schedule.num_stages}, milestones={schedule.milestones} |
| sampling | {config.sample_num_steps} DDIM steps, eta {config.sample_eta}, guidance {config.sample_guidance_scale} |
| branches per prompt | {config.num_branches} (selection thresholds {config.selection_threshold_best} / {config.selection_threshold_worst}) |
| optimisation | lr {config.train_learning_rate}, PPO clip {config.train_clip_range}, {config.train_num_inner_epochs} inner epochs |

## Usage

```python
from diffusers import StableDiffusionPipeline

{load}
image = pipe("a red circle left of a blue square", num_inference_steps={config.sample_num_steps}).images[0]
```
{extra_text}
## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(text)


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
