"""Score a text-to-image pipeline on toy-world prompts with the exact alignment reward.

    python -m b2trl.toy.evaluate [--lora PATH] [--seeds 0 1 2] [--split heldout|train] [--grid grid.png]

Every (prompt, seed) pair gets its own ``torch.Generator`` (seeded from the seed and the prompt's index, see
``b2trl.images.generate_images``), so results do not depend on the batch size and a seed means the same starting
noise before and after RL.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .reward import _COLUMNS, score_attributes
from .world import TEMPLATES, heldout_prompts, train_prompts


def _load(pipeline_or_path=None, lora_path=None):
    from diffusers import DiffusionPipeline

    from . import model_path

    if pipeline_or_path is None or isinstance(pipeline_or_path, str):
        # the pipeline class the folder names: StableDiffusionPipeline or StableDiffusion3Pipeline
        pipe = DiffusionPipeline.from_pretrained(pipeline_or_path or model_path())
    else:
        pipe = getattr(pipeline_or_path, "sd_pipeline", pipeline_or_path)  # accepts TRL's DDPO wrapper too
    if lora_path is not None:
        from ..quiet import hide_known_warnings

        with hide_known_warnings(pipe):
            pipe.load_lora_weights(lora_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe,
    prompts,
    seeds=(0, 1, 2),
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Sample every prompt once per seed (see [`~b2trl.images.generate_images`] for how the noise is seeded).

    Returns:
        `torch.Tensor` of shape ``(len(seeds), len(prompts), 3, H, W)``, float32 in [0, 1], on the CPU.
    """
    from ..images import generate_images

    return generate_images(
        pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
        batch_size=batch_size,
    )


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance (0–255 units) among the seeds of each prompt, averaged over prompts.

    Args:
        images (`torch.Tensor` of shape ``(S, P, 3, H, W)``): samples in [0, 1], seeds first.
    """
    s = images.shape[0]
    if s < 2:
        return float("nan")
    flat = images.reshape(s, images.shape[1], -1).float() * 255
    dists = [(flat[i] - flat[j]).pow(2).mean(1).sqrt() for i in range(s) for j in range(i + 1, s)]  # each (P,)
    return torch.stack(dists).mean().item()


def summarize(images: torch.Tensor, prompts) -> dict:
    """Alignment statistics of ``(S, P, 3, H, W)`` samples for ``prompts``."""
    s, p = images.shape[:2]
    flat_prompts = list(prompts) * s
    attrs, extra, reward, templates = score_attributes(images.reshape(s * p, *images.shape[2:]), flat_prompts)
    per_seed = reward.reshape(s, p).mean(1)
    result = {
        "overall": reward.mean().item(),
        "per_seed": per_seed.tolist(),
        "seed_std": per_seed.std().item() if s > 1 else 0.0,
        "per_template": {},
        "per_template_per_seed": {},
        "per_attribute": {},
        "extra_objects": extra.mean().item(),
        "diversity": diversity(images),
        "per_prompt": dict(zip(prompts, reward.reshape(s, p).mean(0).tolist())),
        "num_images": s * p,
    }
    for t in TEMPLATES:
        mask = torch.tensor([tt == t for tt in templates])
        if mask.any():
            result["per_template"][t] = reward[mask].mean().item()
            result["per_template_per_seed"][t] = [
                reward.reshape(s, p)[k][mask.reshape(s, p)[k]].mean().item() for k in range(s)
            ]
    for j, name in enumerate(_COLUMNS):
        col = attrs[:, j]
        col = col[~torch.isnan(col)]
        if col.numel():
            result["per_attribute"][name] = col.mean().item()
    return result


def evaluate_alignment(
    pipeline_or_path=None,
    lora_path: str | None = None,
    prompts=None,
    seeds=(0, 1, 2),
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 64,
    return_images: bool = False,
) -> dict:
    """Mean exact alignment of a pipeline's samples on toy-world prompts.

    Args:
        pipeline_or_path: a diffusers pipeline (or a training wrapper of one), a folder to load (e.g.
            ``model_path("sd3")``), or `None` for the shipped SD toy model.
        lora_path (`str`, *optional*): a LoRA folder loaded with ``pipe.load_lora_weights`` (this modifies a
            pipeline that was passed in).
        prompts (`list[str]`, *optional*): defaults to :func:`~b2trl.toy.heldout_prompts`.
        seeds: one sample per prompt and seed.
        num_inference_steps, guidance_scale, eta: sampling settings (the RL defaults: 20 steps, 5.0, DDIM eta 1.0;
            a flow model has no eta and is sampled with the T5 length it was trained with).
        batch_size (`int`): prompts per pipeline call.
        return_images (`bool`): also return the ``(S, P, 3, H, W)`` samples under ``"images"``.

    Returns:
        `dict` with ``overall``, ``per_seed``, ``seed_std``, ``per_template``, ``per_template_per_seed``,
        ``per_attribute``, ``extra_objects``, ``diversity`` (0–255 RMS distance between seeds of one prompt),
        ``per_prompt``, ``num_images`` and ``seconds``.
    """
    t0 = time.time()
    pipe = _load(pipeline_or_path, lora_path)
    prompts = list(prompts) if prompts is not None else heldout_prompts()
    images = generate(pipe, prompts, seeds, num_inference_steps, guidance_scale, eta, batch_size)
    result = summarize(images, prompts)
    result["seconds"] = time.time() - t0
    if return_images:
        result["images"] = images
    return result


def save_grid(images, path: str, nrow: int, labels=None, scale: int = 3, pad: int = 2, column_labels=None):
    """Save images as a PNG grid, ``nrow`` images per row, with optional text labels left of each row and above
    each column.

    Args:
        images: ``(N, 3, H, W)`` tensor or array in [0, 1] (or ``(S, P, 3, H, W)`` seeds × prompts, which is laid
            out with one row per prompt and one column per seed).
        path (`str`): output PNG path.
        nrow (`int`): images per row.
        labels (`list[str]`, *optional*): one label per row.
        scale (`int`): nearest-neighbour upscaling factor.
        column_labels (`list[str]`, *optional*): one label per column (e.g. ``"base · seed 0"``).
    """
    from ..images import image_grid

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float().cpu()
    if x.ndim == 5:  # (S, P, ...) -> prompt-major
        x = x.transpose(0, 1).reshape(-1, *x.shape[2:])
    image_grid(x, nrow, row_labels=labels, scale=scale, pad=pad, column_labels=column_labels).save(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Exact alignment of the toy model (or a LoRA on it).")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    p.add_argument("--lora", default=None, help="LoRA folder to load on top")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--grid", default=None, help="save a prompts × seeds PNG here")
    p.add_argument("--json", default=None, help="write the full result here")
    args = p.parse_args(argv)
    prompts = heldout_prompts() if args.split == "heldout" else train_prompts()
    res = evaluate_alignment(
        args.model,
        args.lora,
        prompts,
        args.seeds,
        args.steps,
        args.guidance_scale,
        args.eta,
        args.batch_size,
        return_images=args.grid is not None,
    )
    if args.grid:
        save_grid(res.pop("images"), args.grid, nrow=len(args.seeds), labels=prompts,
                  column_labels=[f"seed {s}" for s in args.seeds])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{args.split}: {len(prompts)} prompts x {len(args.seeds)} seeds in {res['seconds']:.1f}s")
    print(f"overall {res['overall']:.3f} (per seed {', '.join(f'{v:.3f}' for v in res['per_seed'])})")
    for t, v in res["per_template"].items():
        print(f"  {t:9s} {v:.3f}")
    print("  attributes: " + ", ".join(f"{k} {v:.3f}" for k, v in res["per_attribute"].items()))
    print(f"  extra objects per image {res['extra_objects']:.3f}; diversity (RMS 0-255) {res['diversity']:.1f}")
    return res


if __name__ == "__main__":
    main()
