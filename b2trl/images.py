"""Pictures for people: image grids (branch groups with their rewards, before/after comparisons), seeded samples
and the reward curve of a run."""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


def image_grid(
    images,
    nrow: int,
    row_labels: Optional[Sequence[str]] = None,
    tile_labels: Optional[Sequence[str]] = None,
    scale: Optional[int] = None,
    pad: int = 2,
    column_labels: Optional[Sequence[str]] = None,
):
    """
    Lay out ``(N, 3, H, W)`` images in [0, 1] as a grid of `nrow` per row and return a `PIL.Image`.

    Args:
        images: tensor or array ``(N, 3, H, W)`` in [0, 1].
        nrow (`int`): images per row.
        row_labels (`Sequence[str]`, *optional*): a text left of each row (e.g. the prompt).
        tile_labels (`Sequence[str]`, *optional*): a text under each image (e.g. its reward).
        scale (`int`, *optional*): nearest-neighbour upscaling; by default small images are enlarged to ~96 px.
        pad (`int`, *optional*, defaults to `2`): pixels between images.
        column_labels (`Sequence[str]`, *optional*): a text above each column (e.g. which model and seed); a
            label may hold several lines (``"\\n"``).
    """
    from PIL import Image, ImageDraw

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.detach().float().cpu().clamp(0, 1)
    n, _, h, w = x.shape
    scale = scale or max(1, 96 // max(h, w))
    rows = math.ceil(n / nrow)
    tiles = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # measured with the font PIL will draw with, so that long labels never run into the images
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), str(text))
        return right - min(left, 0), bottom

    label_h = 12 if tile_labels else 0
    cell_w = max([w * scale] + [text_size(t)[0] + 4 for t in column_labels or []]) + pad
    cell_h = h * scale + pad + label_h
    top = max(text_size(t)[1] for t in column_labels) + 4 if column_labels else 0
    left = max(text_size(t)[0] for t in row_labels) + 8 if row_labels else 0
    canvas = Image.new("RGB", (left + nrow * cell_w + pad, top + rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        x0, y0 = left + pad + c * cell_w, top + pad + r * cell_h
        canvas.paste(Image.fromarray(tiles[i]).resize((w * scale, h * scale), Image.NEAREST), (x0, y0))
        if tile_labels:
            draw.text((x0, y0 + h * scale), str(tile_labels[i]), fill=(0, 0, 0))
    for c, label in enumerate(column_labels or []):
        draw.multiline_text((left + pad + c * cell_w, 2), str(label), fill=(0, 0, 0))
    for r, label in enumerate(row_labels or []):
        draw.text((4, top + pad + r * cell_h + (h * scale) // 2 - 6), str(label), fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def generate_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    num_inference_steps: int = 20,
    guidance_scale: Optional[float] = 5.0,
    eta: float = 1.0,
    batch_size: int = 64,
    first_index: int = 0,
    **call_kwargs,
) -> torch.Tensor:
    """
    Sample every prompt once per seed, with noise that depends only on the seed and the prompt's position.

    Every (prompt, seed) pair gets its own CPU ``torch.Generator``, seeded with ``seed * 100003 + index`` (the
    prompt's position, counted from `first_index`), so the
    samples do not depend on the batch size or the device, and a seed means the same starting noise for a base
    model and its fine-tune.

    Args:
        pipeline: a diffusers text-to-image pipeline, or a training wrapper holding one as ``sd_pipeline``.
        prompts (`Sequence[str]`): the prompts.
        seeds (`Sequence[int]`, *optional*, defaults to `(0, 1, 2)`): one sample per prompt and seed.
        num_inference_steps (`int`, *optional*, defaults to `20`): denoising steps.
        guidance_scale (`float`, *optional*, defaults to `5.0`): classifier-free guidance scale (1 turns it off;
            `None` does not pass it, for a pipeline that guides under another name).
        eta (`float`, *optional*, defaults to `1.0`): DDIM eta (flow-matching pipelines have none; they get the
            T5 length their model was trained with instead).
        batch_size (`int`, *optional*, defaults to `64`): prompts per pipeline call.
        first_index (`int`, *optional*, defaults to `0`): the position of ``prompts[0]`` in a longer list, of which
            `prompts` is a contiguous share (one process's, during evaluation): its noise is that of its position.
        call_kwargs: further arguments of the pipeline call (e.g. ``negative_prompt``).

    Returns:
        `torch.Tensor` of shape ``(len(seeds), len(prompts), 3, H, W)``, float32 in [0, 1], on the CPU.
    """
    from .models import family_for_pipeline

    family = family_for_pipeline(pipeline)  # a training pipeline's own family, which may carry settings
    pipe = getattr(pipeline, "sd_pipeline", pipeline)
    # DDIM families take eta; a flow family takes its text length instead. An argument set to None is not passed
    # (Qwen-Image's pipeline guides with true_cfg_scale and takes no guidance_scale)
    call_kwargs = {**family.pipeline_call_kwargs(pipe, eta=eta), "guidance_scale": guidance_scale, **call_kwargs}
    call_kwargs = {k: v for k, v in call_kwargs.items() if v is not None}
    prompts = list(prompts)
    out = []
    for seed in seeds:
        per_seed = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            gens = [torch.Generator().manual_seed(int(seed) * 100_003 + first_index + start + i)
                    for i in range(len(chunk))]
            images = pipe(
                chunk,
                num_inference_steps=num_inference_steps,
                generator=gens,
                output_type="pt",
                **call_kwargs,
            ).images
            per_seed.append(images.float().cpu())
        out.append(torch.cat(per_seed))
    return torch.stack(out)


def reward_curve_figure(rows: Sequence[Mapping], heldout: Optional[Mapping] = None,
                        title: str = "B²-DiffuRL training reward"):
    """
    A matplotlib figure of each stage's mean reward (± its standard deviation).

    Args:
        rows (`Sequence[Mapping]`): stage statistics with ``stage``, ``reward_mean`` and ``reward_std``.
        heldout (`Mapping`, *optional*): an evaluation made outside training, drawn on a second axis as two labelled
            horizontal lines: ``{"label": "held-out alignment", "base": 0.87, "trained": 0.90}``.
        title (`str`, *optional*): the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [r["stage"] for r in rows]
    means = [r["reward_mean"] for r in rows]
    stds = [r["reward_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(stages, means, marker="o", label="mean reward of the stage's samples")
    ax.fill_between(stages, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set_xlabel("stage")
    ax.set_ylabel("training reward")
    handles, labels = ax.get_legend_handles_labels()
    if heldout is not None:
        # another quantity than the training reward (other prompts, fixed noise): its own axis, so that neither
        # scale is bent to fit the other
        ax2 = ax.twinx()
        name = heldout.get("label", "evaluation")
        base, trained = float(heldout["base"]), float(heldout["trained"])
        ax2.axhline(base, color="tab:gray", linestyle="--", label=f"{name}, base: {base:.3f}")
        ax2.axhline(trained, color="tab:green", linestyle="--", label=f"{name}, trained: {trained:.3f}")
        margin = max(abs(trained - base), 0.01)
        ax2.set_ylim(min(base, trained) - 2 * margin, max(base, trained) + 2 * margin)
        ax2.set_ylabel(name)
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="lower right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_reward_curve(rows: Sequence[Mapping], path: str, heldout: Optional[Mapping] = None) -> Optional[str]:
    """
    Save [`reward_curve_figure`] as a PNG at `path`; returns `path`, or `None` when matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: skipping the reward curve (pip install matplotlib)")
        return None
    fig = reward_curve_figure(rows, heldout)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


class BranchGridHook:
    """
    An `image_samples_hook` that shows, once per stage, each group's branches side by side with their rewards:
    one row per prompt (its shared prefix), one column per branch.

    With a TensorBoard, W&B or Trackio tracker the grid is logged as the image ``branches`` (see
    [`~b2trl.trackers.log_image`]); without a tracker (or in addition) it is saved as ``branches_<step>.png``
    under `output_dir` when one is given. The step is the stage index, where the trainer logs its statistics.

    Args:
        num_branches (`int`): the config's `num_branches`.
        max_groups (`int`, *optional*, defaults to `8`): groups shown per stage.
        output_dir (`str`, *optional*): where to save PNGs.
    """

    def __init__(self, num_branches: int, max_groups: int = 8, output_dir: Optional[str] = None):
        self.num_branches = num_branches
        self.max_groups = max_groups
        self.output_dir = output_dir

    def grid(self, prompt_image_data):
        images = torch.cat([batch[0] for batch in prompt_image_data])
        prompts = [p for batch in prompt_image_data for p in batch[1]]
        rewards = torch.cat([torch.as_tensor(batch[3]).float().reshape(-1).cpu() for batch in prompt_image_data])
        shown = min(self.max_groups, len(prompts) // self.num_branches) * self.num_branches
        return image_grid(
            images[:shown],
            nrow=self.num_branches,
            row_labels=prompts[:shown : self.num_branches],
            tile_labels=[f"{r:.3f}" for r in rewards[:shown].tolist()],
        )

    def __call__(self, prompt_image_data, global_step, tracker=None):
        from .trackers import log_image

        grid = self.grid(prompt_image_data)
        log_image(tracker, "branches", grid, global_step)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            grid.save(os.path.join(self.output_dir, f"branches_{global_step:06d}.png"))
        return grid
