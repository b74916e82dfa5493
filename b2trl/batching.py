"""How a stage's kept transitions become micro-batches: training rows (padded so every process trains as many),
shuffling, accumulation windows, stacked steps.

A stage's samples are a dict of tensors with one row per kept sample; the keys in `TIME_KEYS` have a second,
time axis with one entry per interval step. Rows can be bound in groups (`group_size`, e.g. the two members of
a preference pair): a group is shuffled as one unit, its members see the same order of interval steps, and
micro-batches never split it.
"""

from __future__ import annotations

import numpy as np
import torch

from .advantages.pairs import kept_pairs as _kept_pairs

# keys of a recorded sample that have a time axis (one entry per interval step)
TIME_KEYS = ("timesteps", "latents", "next_latents", "log_probs", "ref_log_probs", "ref_predictions")


def shuffle(samples: dict[str, torch.Tensor], *, group_size: int = 1) -> dict[str, torch.Tensor]:
    """
    The samples in a random order of rows (whole groups of `group_size` rows), each sample's interval steps in
    an independent random order (shared by the members of a group).
    """
    total, num_steps = samples["timesteps"].shape
    device = samples["timesteps"].device
    if total % group_size:
        raise ValueError(f"{total} rows do not split into groups of {group_size}.")
    if group_size == 1:
        perm = torch.randperm(total, device=device)
        time_perm = torch.argsort(torch.rand(total, num_steps, device=device), dim=1)
    else:
        units = total // group_size
        offsets = torch.arange(group_size, device=device)
        perm = (torch.randperm(units, device=device)[:, None] * group_size + offsets).reshape(-1)
        time_perm = torch.argsort(torch.rand(units, num_steps, device=device), dim=1)
        time_perm = time_perm.repeat_interleave(group_size, dim=0)
    shuffled = {k: v[perm] for k, v in samples.items()}
    rows = torch.arange(total, device=device)[:, None]
    for key in TIME_KEYS:
        if key in shuffled:
            shuffled[key] = shuffled[key][rows, time_perm]
    return shuffled


def accumulation_windows(
    total: int, batch_size: int, accumulation_steps: int, *, group_size: int = 1
) -> list[list[slice]]:
    """
    Micro-batches of at most `batch_size` rows (rounded up to whole groups), `accumulation_steps` of them per
    optimizer step; the last window holds what is left.
    """
    size = -(-batch_size // group_size) * group_size
    batches = [slice(start, min(start + size, total)) for start in range(0, total, size)]
    return [batches[i : i + accumulation_steps] for i in range(0, len(batches), accumulation_steps)]


def micro_batches(
    samples: dict[str, torch.Tensor],
    *,
    batch_size: int,
    accumulation_steps: int,
    steps_per_forward: int = 1,
    group_size: int = 1,
):
    """
    One pass over a stage's samples, shuffled: yields ``(batch, scale, closes_window)`` per denoiser call.

    `batch` holds a micro-batch's rows for `steps_per_forward` interval steps (see [`stack_steps`]); its loss is
    a mean over those rows, and ``loss * scale`` is its share of the window's average over samples x steps;
    `closes_window` is true for the last call before an optimizer step (where gradients are synchronised).

    A micro-batch with fewer rows than `batch_size` (few kept samples, or the last one of a pass) stacks
    proportionally more steps per call, so no call exceeds ``batch_size * steps_per_forward`` rows and small
    kept sets do not pay for half-empty calls. The gradient is the same either way.
    """
    total, num_steps = samples["timesteps"].shape
    full_rows = -(-batch_size // group_size) * group_size  # a full micro-batch, in whole groups
    shuffled = shuffle(samples, group_size=group_size)
    for window in accumulation_windows(total, batch_size, accumulation_steps, group_size=group_size):
        window_rows = sum(b.stop - b.start for b in window)
        for index, rows in enumerate(window):
            sample = {k: v[rows] for k, v in shuffled.items()}
            weight = (rows.stop - rows.start) / (window_rows * num_steps)
            per_forward = steps_per_forward * max(1, full_rows // (rows.stop - rows.start))
            for steps in step_chunks(num_steps, per_forward):
                closes = index == len(window) - 1 and steps.stop == num_steps
                # a loss that is a mean over k steps' rows stands for k single-step losses
                yield stack_steps(sample, steps, group_size=group_size), weight * (steps.stop - steps.start), closes


def step_chunks(num_steps: int, per_forward: int) -> list[slice]:
    """Interval steps `per_forward` at a time: the steps stacked into one denoiser call."""
    return [slice(start, min(start + per_forward, num_steps)) for start in range(0, num_steps, per_forward)]


def stack_steps(sample: dict[str, torch.Tensor], steps: slice, *, group_size: int = 1) -> dict[str, torch.Tensor]:
    """
    One row per (sample, step) for the interval steps `steps` of a micro-batch. Sample-major: sample i's k steps
    are rows ``i*k .. i*k + k - 1``; with groups, group-major and then step-major, so that the members of a group
    at one step stay adjacent (rows ``2j`` and ``2j + 1`` are a pair at the same step). Per-sample tensors
    (advantages, conditioning) are repeated to match.
    """
    k = steps.stop - steps.start
    stacked = {}
    for key, value in sample.items():
        if key in TIME_KEYS:
            value = value[:, steps]
        else:
            value = value.unsqueeze(1).expand(value.shape[0], k, *value.shape[1:])
        if group_size > 1:
            value = value.reshape(-1, group_size, k, *value.shape[2:]).transpose(1, 2)
        stacked[key] = value.reshape(-1, *value.shape[(3 if group_size > 1 else 2):])
    return stacked


def training_rows(keep: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """[`pad_rows`] with the padding as a weight: ``(rows, row_weight)``, weight 1 for kept rows, 0 for padding."""
    rows, is_padding = pad_rows(keep, target)
    return rows, (~is_padding).astype(np.float32)


def pad_rows(keep: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """
    Row indices of the kept samples, padded to `target` rows with other (or repeated) rows.

    Padding rows are trained with advantage 0 (zero loss, zero gradient): they only make every process run the
    same number of backward passes, which DDP's all-reduce requires.

    Returns:
        `(rows, is_padding)`: int64 indices and a bool mask of the padding rows.
    """
    keep = np.asarray(keep, dtype=bool)
    kept = np.flatnonzero(keep)
    if target < len(kept):
        raise ValueError(f"target ({target}) is smaller than the number of kept rows ({len(kept)}).")
    pool = np.concatenate([np.flatnonzero(~keep), kept]) if len(keep) else kept
    extra = np.resize(pool, target - len(kept)) if target > len(kept) else np.zeros(0, dtype=np.int64)
    rows = np.concatenate([kept, extra]).astype(np.int64)
    return rows, np.arange(target) >= len(kept)


def pair_rows(z: np.ndarray, keep: np.ndarray, target_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """
    Row indices (into the flattened ``(groups, branches)`` samples) of each kept group's (winner, loser) pair by
    `z`, winners at even positions, padded to `target_pairs` pairs with other rows.

    Padding pairs get weight 0 (no loss, no gradient): they only make every process run the same number of
    backward passes, which DDP's all-reduce requires.

    Returns:
        `(rows, row_weight)`: ``2 * target_pairs`` int64 indices and a float mask, 1 for a real pair's rows.
    """
    branches = np.shape(z)[1]
    pairs = [(g * branches + hi, g * branches + lo) for g, hi, lo in _kept_pairs(z, keep)]
    if target_pairs < len(pairs):
        raise ValueError(f"target_pairs ({target_pairs}) is smaller than the number of kept pairs ({len(pairs)}).")
    padding = np.resize(np.arange(np.size(z)), 2 * (target_pairs - len(pairs)))
    rows = np.concatenate([np.asarray(pairs, dtype=np.int64).reshape(-1), padding.astype(np.int64)])
    weight = (np.arange(2 * target_pairs) < 2 * len(pairs)).astype(np.float32)
    return rows, weight
