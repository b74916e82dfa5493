"""Image grids for people: branch groups with their rewards, before/after comparisons."""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch


def image_grid(
    images,
    nrow: int,
    row_labels: Optional[Sequence[str]] = None,
    tile_labels: Optional[Sequence[str]] = None,
    scale: Optional[int] = None,
    pad: int = 2,
):
    """
    Lay out ``(N, 3, H, W)`` images in [0, 1] as a grid of `nrow` per row and return a `PIL.Image`.

    Args:
        images: tensor or array ``(N, 3, H, W)`` in [0, 1].
        nrow (`int`): images per row.
        row_labels (`Sequence[str]`, *optional*): a text left of each row (e.g. the prompt).
        tile_labels (`Sequence[str]`, *optional*): a text under each image (e.g. its reward).
        scale (`int`, *optional*): nearest-neighbour upscaling; by default small images are enlarged to ~96 px.
    """
    from PIL import Image, ImageDraw

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.detach().float().cpu().clamp(0, 1)
    n, _, h, w = x.shape
    scale = scale or max(1, 96 // max(h, w))
    rows = math.ceil(n / nrow)
    tiles = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    label_h = 12 if tile_labels else 0
    cell_w, cell_h = w * scale + pad, h * scale + pad + label_h
    left = 6 * max(len(str(t)) for t in row_labels) + 8 if row_labels else 0
    canvas = Image.new("RGB", (left + nrow * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        x0, y0 = left + pad + c * cell_w, pad + r * cell_h
        canvas.paste(Image.fromarray(tiles[i]).resize((w * scale, h * scale), Image.NEAREST), (x0, y0))
        if tile_labels:
            draw.text((x0, y0 + h * scale), str(tile_labels[i]), fill=(0, 0, 0))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * cell_h + (h * scale) // 2 - 6), str(label), fill=(0, 0, 0))
    return canvas


class BranchGridHook:
    """
    An `image_samples_hook` that shows, once per stage, each group's branches side by side with their rewards:
    one row per prompt (its shared prefix), one column per branch.

    With a TensorBoard or W&B tracker the grid is logged as the image ``branches``; without a tracker (or in
    addition) it is saved as ``branches_<step>.png`` under `output_dir` when one is given.

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
        grid = self.grid(prompt_image_data)
        if tracker is not None and getattr(tracker, "name", None) == "tensorboard":
            tracker.writer.add_image("branches", np.asarray(grid), global_step, dataformats="HWC")
        elif tracker is not None and getattr(tracker, "name", None) == "wandb":
            import wandb

            tracker.log({"branches": wandb.Image(grid)}, step=global_step)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            grid.save(os.path.join(self.output_dir, f"branches_{global_step:06d}.png"))
        return grid
