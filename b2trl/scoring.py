"""Calling the user's prompt and reward functions, checking what they returned, and summarising it."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from accelerate import logging

logger = logging.get_logger(__name__)


def callable_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def next_prompt(prompt_fn):
    """One ``(prompt, metadata)`` from `prompt_fn`; its failures and wrong return types name it."""
    name = callable_name(prompt_fn)
    try:
        result = prompt_fn()
    except Exception as err:
        raise RuntimeError(f"prompt_function {name} raised: {err!r}") from err
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)):
        raise TypeError(f"prompt_function {name} must return (prompt: str, metadata), got {result!r}.")
    return result


def call_reward_function(reward_fn, batches, device, executor=None):
    """
    ``(rewards, metadata)``: one float32 tensor on `device` and one metadata object per batch. With an
    `executor` (a thread pool) the batches are scored concurrently.
    """
    if executor is not None:
        pending = [executor.submit(reward_fn, *batch[:3]) for batch in batches]
        results = [job.result() for job in pending]
    else:
        results = [reward_fn(*batch[:3]) for batch in batches]
    rewards, metadata = [], []
    for result in results:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(
                f"reward_function {callable_name(reward_fn)} must return (rewards, metadata), "
                f"got {type(result).__name__}."
            )
        # bf16/fp16 rewards are promoted: numpy has no bf16
        rewards.append(torch.as_tensor(result[0], device=device).float())
        metadata.append(result[1])
    return rewards, metadata


def check_rewards(rewards, batches, stage: int, name: str, drop_nonfinite: bool) -> list[torch.Tensor]:
    """
    One reward per image of each batch, finite unless `drop_nonfinite` (then non-finite rewards become NaN,
    which selection and statistics leave out). Raises `ValueError` naming the reward function and the fix.
    """
    for reward, batch in zip(rewards, batches):
        images = batch[0]
        if reward.shape != (images.shape[0],):
            raise ValueError(
                f"reward_function {name} returned rewards of shape {tuple(reward.shape)} at stage {stage}; "
                f"expected ({images.shape[0]},), one per image."
            )
    checked = []
    for reward in rewards:
        bad = ~torch.isfinite(reward)
        if bad.any():
            if not drop_nonfinite:
                raise ValueError(
                    f"reward_function {name} returned non-finite rewards (NaN/inf) at stage {stage}: "
                    f"{reward.tolist()}. Fix the reward, or set drop_nonfinite_rewards=True to drop such samples."
                )
            logger.warning(f"Stage {stage}: dropping {int(bad.sum())} samples with non-finite rewards from {name}.")
            reward = reward.masked_fill(bad, float("nan"))
        checked.append(reward)
    return checked


def reward_parts(rewards_metadata, batch_sizes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """
    The parts of a reward made of parts (``metadata["components"]``, as `CompositeReward` reports them), over the
    sampling batches: ``(per_sample, values, weights)``. `per_sample` holds the parts every batch reported with one
    value per sample, concatenated in sample order (what per-reward advantages need); `values` every part's values
    whatever their number (a part may score only some samples, e.g. a relation score for the prompts that have a
    relation), for logging ``reward/<part>``; `weights` the parts' weights (``metadata["weights"]``).
    """
    per_sample: dict[str, list] = defaultdict(list)
    values: dict[str, list] = defaultdict(list)
    weights: dict[str, float] = {}
    for metadata, size in zip(rewards_metadata, batch_sizes):
        components = metadata.get("components") if isinstance(metadata, dict) else None
        if not isinstance(components, dict):
            continue
        for name, part in components.items():
            part = torch.as_tensor(part, dtype=torch.float64).reshape(-1).cpu().numpy()
            values[name].append(part)
            if part.size == size:
                per_sample[name].append(part)
        weights.update({k: float(v) for k, v in (metadata.get("weights") or {}).items()})
    complete = {name: np.concatenate(v) for name, v in per_sample.items() if len(v) == len(batch_sizes)}
    return complete, {name: np.concatenate(v) for name, v in values.items()}, weights


def stage_statistics(stage) -> dict:
    """A scored, selected [`~b2trl.stage.Stage`]'s rewards, interval and selection counts, from the gathered
    arrays (the same on every process, with no further communication)."""
    first, end = stage.interval
    rewards, keep, advantages = stage.rewards, stage.keep, stage.advantages
    # how kept samples are pushed up vs down: when the advantages sum far below zero, the update mostly pushes
    # likelihoods down, which degrades a model faster than the positive samples teach it
    kept_adv = advantages[keep]
    stats = {
        "stage": stage.index,
        "reward_mean": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan"),
        "reward_std": float(np.nanstd(rewards)) if np.isfinite(rewards).any() else float("nan"),
        "rewards_dropped": int(np.isnan(rewards).sum()),
        "interval_length": end - first,
        "branch_point": first,
        "interval_end": end,
        "groups_kept": int(stage.groups(keep).any(1).sum()),
        "groups_total": int(stage.groups(keep).shape[0]),
        "samples_kept": int(keep.sum()),
        "samples_total": int(rewards.size),
        "samples_kept_positive": int((kept_adv > 0).sum()),
        "samples_kept_negative": int((kept_adv < 0).sum()),
        "kept_advantage_sum": float(kept_adv.sum()),
    }
    return stats


class NegativeSkewWatch:
    """
    Notices when a run's updates have mostly pushed likelihoods down: over the last `stages` stages together, the
    kept samples with a negative advantage outnumber those with a positive one `ratio` to 1 or more. With a skewed
    reward (most samples good, a few failures with large negative z-scores) best/worst selection keeps mostly
    failures; the update then lowers the likelihood of what the model does, more samples fail, and the loop can
    collapse the model. Summing over a window rather than requiring every stage to be skewed sees through one
    balanced stage in the middle of the loop: on the toy study's records it warns 0–18 stages earlier than a
    three-in-a-row rule and still on none of the runs that did not collapse. [`update`] returns the warning once
    per run.
    """

    def __init__(self, stages: int = 3, ratio: float = 2.0):
        self.stages, self.ratio = stages, ratio
        self.counts: list[tuple[int, int]] = []
        self.warned = False

    def update(self, stats: dict):
        """The stage's statistics in; the warning text the first time the last `stages` stages are skewed."""
        self.counts = (self.counts + [(stats["samples_kept_positive"], stats["samples_kept_negative"])])[-self.stages:]
        if self.warned or len(self.counts) < self.stages:
            return None
        positive, negative = sum(p for p, _ in self.counts), sum(n for _, n in self.counts)
        if not (negative > positive and negative >= self.ratio * positive):
            return None
        self.warned = True
        return (
            f"Stages {stats['stage'] - self.stages + 1}-{stats['stage']}: the kept samples' advantages were mostly "
            f"negative ({negative} negative vs {positive} positive; per stage "
            f"{', '.join(f'{n} vs {p}' for p, n in self.counts)}), so the updates mostly push "
            "likelihoods down, which can collapse the model (docs/toy_world.md, 'Skewed rewards'). "
            "selection_rule='pairs' trains each group's best and worst branch together with zero-sum advantages; a "
            "lower train_learning_rate or fewer stages also help. kept_advantage_sum is logged every stage."
        )
