"""Evaluation during training: fixed prompts and noise seeds, sampled with the trained pipeline and scored with one
or more rewards.

An [`Evaluator`] samples every evaluation prompt once per seed of `eval_seeds` through the diffusers pipeline being
trained (with the EMA weights when the run keeps them), as the run samples: its steps, eta, guidance and
resolution. A (prompt, seed) pair's noise depends only on the seed and the prompt's position in the list
([`~b2trl.images.generate_images`]), so every evaluation of a run, any process count and any batch size start
from the same noise: two evaluations of unchanged weights give the same scores. With several processes each
samples a contiguous share of the prompts (padded so that every process makes the same pipeline calls), and the
scores are gathered.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import logging
from accelerate.utils import broadcast_object_list, gather_object

from .evaluation_config import TRAINING_REWARD, eval_reward_names, metric_key, prompt_sources
from .prompts import PromptSourceError, load_prompts_dataset, read_prompts_file
from .scoring import call_reward_function, callable_name

logger = logging.get_logger(__name__)

GRID_PROMPTS = 8  # prompts shown in the evaluation grid (rows); every prompt is scored
GRID_TILE_PIXELS = 256  # larger images are shrunk to this in the grid, to keep it a few MB


def evaluation_prompts(config) -> list[str]:
    """The evaluation prompts of `config`: `eval_prompts`, the lines of `eval_prompts_file` or the column of
    `eval_prompts_dataset`. Raises `ValueError` naming the field when the source cannot be read."""
    sources = prompt_sources(config)
    if not sources:
        return []
    (name, value), = sources.items()
    if name == "eval_prompts":
        return [str(p) for p in value]
    try:
        if name == "eval_prompts_file":
            return read_prompts_file(value)
        return load_prompts_dataset(value, config.eval_prompts_dataset_split, config.eval_prompts_dataset_column)
    except PromptSourceError as err:
        fields = {"source": name, "split": "eval_prompts_dataset_split", "column": "eval_prompts_dataset_column"}
        raise ValueError(f"{fields[err.field]}: {err}") from None


@dataclass
class EvalResult:
    """
    One evaluation.

    Attributes:
        metrics: ``{"eval/<reward>": mean}`` over every prompt and seed (the same on every process).
        scores: ``{"eval/<reward>": (prompts, seeds) array}`` of every process's samples.
        prompts, seeds: what was sampled.
        grid: the labelled grid of the first prompts (rows) × seeds (columns) with their scores, a `PIL.Image`
            (main process only; `None` elsewhere).
        seconds: wall time of the evaluation.
    """

    metrics: dict[str, float]
    scores: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    prompts: list[str] = field(repr=False, default_factory=list)
    seeds: list[int] = field(default_factory=list)
    grid: Any = field(repr=False, default=None)
    seconds: float = 0.0


class Evaluator:
    """
    Samples and scores the evaluation prompts of a run.

    Args:
        config ([`B2DiffuRLConfig`]): the run's configuration (prompts, seeds, rewards, sampling settings).
        training_reward (`Callable`): the training reward function, scored as ``eval/reward`` when `eval_rewards`
            is empty or names ``"reward"``.
        prompts (`list[str]`, *optional*): the prompts; by default those `config` names.
    """

    def __init__(self, config, training_reward: Callable, prompts: Optional[list[str]] = None):
        from .rewards import get_reward

        self.config = config
        self.prompts = list(prompts) if prompts is not None else evaluation_prompts(config)
        if not self.prompts:
            raise ValueError("evaluation needs prompts: set eval_prompts, eval_prompts_file or eval_prompts_dataset.")
        self.seeds = [int(s) for s in config.eval_seeds]
        self.rewards: dict[str, Callable] = {}
        for name in eval_reward_names(config):
            try:
                self.rewards[metric_key(name)] = training_reward if name == TRAINING_REWARD else get_reward(name)
            except (ValueError, TypeError) as err:
                raise ValueError(f"eval_rewards: {err}") from None

    # ------------------------------------------------------------------ sampling

    def _share(self, process_index: int, num_processes: int) -> tuple[int, int, list[str]]:
        """``(first, real, prompts)``: this process's contiguous share of the prompts, starting at `first`, of
        which the first `real` are its own and the rest repeat the last prompt, so every share has the same size."""
        size = math.ceil(len(self.prompts) / num_processes)
        first = process_index * size
        real = max(0, min(size, len(self.prompts) - first))
        last = len(self.prompts) - 1
        return first, real, [self.prompts[min(first + i, last)] for i in range(size)]

    @property
    def prompts_per_call(self) -> int:
        """Prompts per pipeline call (each sampled once per seed): a sampling batch's images, or
        `rollout_chunk_size`."""
        config = self.config
        return max(1, config.rollout_chunk_size or config.sample_batch_size * config.num_branches)

    def sample(self, trainer, prompts: list[str], first_index: int) -> torch.Tensor:
        """`prompts` × seeds through the trained pipeline as the run samples, ``(seeds, prompts, 3, H, W)``;
        `first_index` is the position of ``prompts[0]`` in the evaluation prompts (it decides the noise)."""
        from .images import generate_images

        config = self.config
        height, width = trainer.image_size
        ema = trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()
        trainer.denoiser.eval()
        with ema, trainer.autocast(), torch.no_grad():
            return generate_images(
                trainer.sd_pipeline, prompts, self.seeds, num_inference_steps=config.sample_num_steps,
                eta=config.sample_eta, batch_size=self.prompts_per_call, first_index=first_index, height=height,
                width=width, **trainer.family.guidance_call_kwargs(config),
            )

    def score(self, images: torch.Tensor, prompts: list[str], device) -> dict[str, np.ndarray]:
        """Each reward of ``(seeds, prompts, 3, H, W)`` images: ``{key: (prompts, seeds)}`` float64, non-finite
        rewards as NaN."""
        scores = {}
        batches = [[images[s].to(device), tuple(prompts), tuple({} for _ in prompts)] for s in range(len(images))]
        for key, reward_fn in self.rewards.items():
            try:
                rewards, _ = call_reward_function(reward_fn, batches, device)
            except Exception as err:
                raise RuntimeError(f"evaluation reward {key} ({callable_name(reward_fn)}) raised: {err!r}") from err
            for reward in rewards:
                if reward.shape != (len(prompts),):
                    raise ValueError(f"evaluation reward {key} returned shape {tuple(reward.shape)}; expected "
                                     f"({len(prompts)},), one per image.")
            values = torch.stack(rewards).double().cpu().numpy().T  # (prompts, seeds)
            bad = ~np.isfinite(values)
            if bad.any():
                logger.warning(f"evaluation reward {key} returned NaN/inf for {int(bad.sum())} images; the mean "
                               "leaves them out.")
            scores[key] = np.where(bad, np.nan, values)
        return scores

    # ------------------------------------------------------------------ one evaluation

    def evaluate(self, trainer) -> EvalResult:
        """
        Sample and score every prompt × seed. Every process takes part (each samples its share); the metrics
        are gathered, and the main process's copy is broadcast, so that every process decides on the same numbers.
        """
        start = time.perf_counter()
        accelerator = trainer.accelerator
        first, real, prompts = self._share(accelerator.process_index, accelerator.num_processes)
        parts, tiles = {key: [] for key in self.rewards}, []
        # a chunk at a time: only the scores and the grid's images are kept, whatever the number of prompts
        for offset in range(0, len(prompts), self.prompts_per_call):
            chunk = prompts[offset : offset + self.prompts_per_call]
            images = self.sample(trainer, chunk, first + offset)
            for key, values in self.score(images, chunk, accelerator.device).items():
                parts[key].append(values)
            shown = max(0, min(len(chunk), real - offset, GRID_PROMPTS - first - offset))
            tiles.append((images[:, :shown].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        local = {key: np.concatenate(values)[:real] for key, values in parts.items()}
        tiles = np.concatenate(tiles, axis=1)
        payload = [{"first": first, "scores": local, "tiles": tiles}]
        gathered = gather_object(payload) if accelerator.num_processes > 1 else payload
        gathered = sorted(gathered, key=lambda g: g["first"])
        scores = {key: np.concatenate([g["scores"][key] for g in gathered]) for key in self.rewards}
        metrics = {key: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for key, v in scores.items()}
        if accelerator.num_processes > 1:
            metrics = broadcast_object_list([metrics])[0]
        grid = None
        if accelerator.is_main_process:
            tiles = np.concatenate([g["tiles"] for g in gathered], axis=1)
            grid = self.grid(tiles, scores)
        return EvalResult(metrics=metrics, scores=scores, prompts=list(self.prompts), seeds=list(self.seeds),
                          grid=grid, seconds=time.perf_counter() - start)

    def grid(self, tiles: np.ndarray, scores: dict[str, np.ndarray]):
        """The first prompts (rows) × seeds (columns), each image labelled with its scores (`/`-separated, in the
        order of `eval_rewards`), the columns with their seed and the rows with their prompt."""
        from .images import image_grid

        seeds, shown = tiles.shape[:2]
        x = torch.from_numpy(tiles).float().div(255).transpose(0, 1).reshape(seeds * shown, *tiles.shape[2:])
        if max(x.shape[-2:]) > GRID_TILE_PIXELS:
            factor = GRID_TILE_PIXELS / max(x.shape[-2:])
            x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear", antialias=True)
        labels = [" / ".join(f"{scores[key][p, s]:.3f}" for key in scores) for p in range(shown) for s in range(seeds)]
        rows = [p if len(p) <= 40 else p[:37] + "..." for p in self.prompts[:shown]]
        columns = [f"seed {s}" for s in self.seeds]
        columns[0] += "\n" + " / ".join(key.removeprefix("eval/") for key in scores)  # what the numbers are
        return image_grid(x, nrow=seeds, row_labels=rows, tile_labels=labels, column_labels=columns)
