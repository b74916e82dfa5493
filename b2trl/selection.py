"""Per-prompt reward statistics, advantages and the best/worst selection rule of B²-DiffuRL.

Pure NumPy: no torch modules, no accelerate, so the rule is unit-tested in milliseconds.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence

import numpy as np

SELECTION_RULES = ("best_worst", "pairs", "all")


class PromptRewardHistory:
    """
    Rewards seen for each prompt over the current stage and the previous `history_stages` stages.

    [`PromptRewardHistory.update`] adds one stage's rewards and returns their z-scores against the pooled
    rewards of that prompt in the window (this stage included). TRL's `PerPromptStatTracker` keeps a fixed
    number of samples; this one keeps a fixed number of *stages*, as the method prescribes.

    NaN rewards (samples whose reward could not be computed) are left out of the statistics and get a NaN z.

    Args:
        history_stages (`int`):
            How many previous stages are pooled with the current one (reference: 8).
        eps (`float`, *optional*, defaults to `1e-6`):
            A prompt whose pooled standard deviation is below `eps` gets z = 0: its samples did not differ.
    """

    def __init__(self, history_stages: int, eps: float = 1e-6):
        if history_stages < 0:
            raise ValueError(f"history_stages must be >= 0, got {history_stages}.")
        self.history_stages = history_stages
        self.eps = eps
        self._stages: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Iterable[float]) -> np.ndarray:
        """Record one stage's `rewards` (one per prompt occurrence) and return their z-scores."""
        rewards = np.asarray(list(rewards) if not isinstance(rewards, np.ndarray) else rewards, dtype=np.float64)
        if rewards.ndim != 1 or len(prompts) != len(rewards):
            raise ValueError(f"got {len(prompts)} prompts for rewards of shape {rewards.shape}; they must match.")
        prompts = np.asarray(prompts, dtype=object)
        z = np.zeros_like(rewards)
        for prompt in dict.fromkeys(prompts.tolist()):
            rows = prompts == prompt
            window = self._stages.setdefault(prompt, deque(maxlen=self.history_stages + 1))
            window.append(rewards[rows][~np.isnan(rewards[rows])])
            pooled = np.concatenate(list(window))
            std = pooled.std() if pooled.size else 0.0
            z[rows] = 0.0 if std < self.eps else (rewards[rows] - pooled.mean()) / std
            z[rows & np.isnan(rewards)] = np.nan
        return z

    def stats(self) -> dict[str, tuple[float, float, int]]:
        """Mean, std and sample count of each prompt's pooled window."""
        out = {}
        for prompt, window in self._stages.items():
            pooled = np.concatenate(list(window))
            out[prompt] = (float(pooled.mean()), float(pooled.std()), int(pooled.size))
        return out

    def state_dict(self) -> dict:
        return {
            "history_stages": self.history_stages,
            "stages": {p: [w.tolist() for w in window] for p, window in self._stages.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._stages = {
            p: deque((np.asarray(w, dtype=np.float64) for w in windows), maxlen=self.history_stages + 1)
            for p, windows in state["stages"].items()
        }


def _best_and_worst(z):
    """`z` as a float array, its group indices, and each group's best and worst branch (NaN never wins)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must have shape (groups, branches), got {z.shape}.")
    missing = np.isnan(z)
    best = np.where(missing, -np.inf, z).argmax(axis=1)
    worst = np.where(missing, np.inf, z).argmin(axis=1)
    return z, np.arange(z.shape[0]), best, worst


def select_best_worst(z: np.ndarray, threshold_best: float, threshold_worst: float) -> np.ndarray:
    """
    The B²-DiffuRL selection rule on a ``(groups, branches)`` array of z-scores.

    In each group the best branch is kept if its z >= `threshold_best` and the worst branch if its
    z < `threshold_worst`; every other branch is dropped. A group whose branches barely differ keeps nothing.
    NaN z-scores (dropped samples) are never kept.

    Returns:
        A boolean mask of the same shape: `True` for kept samples.
    """
    z, rows, best, worst = _best_and_worst(z)
    keep = np.zeros(z.shape, dtype=bool)
    keep[rows, best] = z[rows, best] >= threshold_best  # False for NaN
    keep[rows, worst] |= z[rows, worst] < threshold_worst
    return keep


def select_pairs(z: np.ndarray, min_gap: float) -> np.ndarray:
    """
    Keep each group's best *and* worst branch together, if their z-scores differ by at least `min_gap`.

    Unlike [`select_best_worst`], a group contributes a pair or nothing, so the kept samples can be given
    advantages that sum to zero per group (see [`pair_advantages`]).

    Returns:
        A boolean mask of the ``(groups, branches)`` shape of `z`.
    """
    z, rows, best, worst = _best_and_worst(z)
    keep = np.zeros(z.shape, dtype=bool)
    gap = z[rows, best] - z[rows, worst]  # NaN when a group has no valid sample
    paired = (gap >= min_gap) & (best != worst)
    keep[rows[paired], best[paired]] = True
    keep[rows[paired], worst[paired]] = True
    return keep


def kept_pairs(z: np.ndarray, keep: np.ndarray) -> list[tuple[int, int, int]]:
    """``(group, best, worst)`` of every group with kept samples: its highest and lowest kept branch by `z`."""
    z = np.asarray(z, dtype=np.float64)
    found = []
    for g in np.flatnonzero(keep.any(axis=1)):
        members = np.flatnonzero(keep[g])
        found.append((int(g), int(members[np.argmax(z[g, members])]), int(members[np.argmin(z[g, members])])))
    return found


def pair_advantages(z: np.ndarray, keep: np.ndarray, clip: float) -> np.ndarray:
    """
    Advantages for [`select_pairs`]: the kept best branch gets ``+gap/2`` and the kept worst ``-gap/2``, where
    ``gap`` is their z-score difference, clipped to ``[-clip, clip]``; every other sample gets 0.
    """
    z = np.asarray(z, dtype=np.float64)
    adv = np.zeros(z.shape)
    for g, hi, lo in kept_pairs(z, keep):
        half = min((z[g, hi] - z[g, lo]) / 2, clip)
        adv[g, hi], adv[g, lo] = half, -half
    return adv


def select(z: np.ndarray, rule: str, threshold_best: float, threshold_worst: float) -> np.ndarray:
    """Apply a selection `rule` (one of `SELECTION_RULES`) to ``(groups, branches)`` z-scores.

    ``"pairs"`` keeps a group's best and worst branches when their z-scores differ by at least
    ``threshold_best - threshold_worst``.
    """
    if rule == "best_worst":
        return select_best_worst(z, threshold_best, threshold_worst)
    if rule == "pairs":
        return select_pairs(z, threshold_best - threshold_worst)
    if rule == "all":
        return ~np.isnan(np.asarray(z, dtype=np.float64))
    raise ValueError(f"selection_rule must be one of {SELECTION_RULES}, got {rule!r}.")


def advantages_from_z(z: np.ndarray, clip: float) -> np.ndarray:
    """Advantage of a kept sample: its z-score clipped to ``[-clip, clip]`` (0 for a NaN z)."""
    return np.clip(np.nan_to_num(np.asarray(z, dtype=np.float64), nan=0.0), -clip, clip)


def stage_advantages(z: np.ndarray, keep: np.ndarray, rule: str, clip: float) -> np.ndarray:
    """Advantages of a stage's samples (``(groups, branches)`` arrays), as the selection `rule` defines them."""
    if rule == "pairs":
        return pair_advantages(z, keep, clip)
    return advantages_from_z(z, clip)


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
    pairs = [(g * branches + hi, g * branches + lo) for g, hi, lo in kept_pairs(z, keep)]
    if target_pairs < len(pairs):
        raise ValueError(f"target_pairs ({target_pairs}) is smaller than the number of kept pairs ({len(pairs)}).")
    padding = np.resize(np.arange(np.size(z)), 2 * (target_pairs - len(pairs)))
    rows = np.concatenate([np.asarray(pairs, dtype=np.int64).reshape(-1), padding.astype(np.int64)])
    weight = (np.arange(2 * target_pairs) < 2 * len(pairs)).astype(np.float32)
    return rows, weight
