"""Weighted sum of several rewards, reporting each part so the trainer can log `reward/<part>`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

from .base import as_reward_tensor, check_reward_inputs


def _part_name(reward) -> str:
    name = getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__
    return str(name)


class _RunningStats:
    """Running mean and (population) variance of every value seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().cpu()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 1.0


class CompositeReward:
    """Weighted sum of rewards: `reward = sum_i weight_i * part_i(images, prompts, prompt_metadata)`.

    Args:
        rewards (`Mapping[str | Callable, float]`):
            parts and their weights. A key is a registry name (resolved with [`get_reward`], default
            arguments), a `"module:function"` string, or any TRL-protocol callable (a scorer instance built
            with your own arguments, or a plain function). A part is named after its registry name, else its
            `name` attribute, else its `__name__`, else its class name; repeated names get `_1`, `_2` suffixes.
        normalize (`bool`, *optional*, defaults to `False`):
            If `True`, each part's raw score `x` is replaced by `(x - mean) / (std + eps)` before weighting,
            where `mean`/`std` are that part's running mean and population standard deviation over **every
            value it has produced so far, the current batch included** (stats are updated first, then
            applied). So the first batch is standardised by its own statistics, and later batches by the
            accumulated history. Statistics are per process (not synchronised across GPUs) and per instance.
            Without it, parts with large ranges (PickScore ~20, JPEG tens of kB) dominate parts with small
            ones (CLIPScore ~0.3) unless the weights compensate.
        eps (`float`, *optional*, defaults to 1e-6): added to the standard deviation when normalising.

    Returns (when called):
        `(rewards, metadata)`: rewards a float32 `(B,)` tensor on the images' device; metadata a dict with
        `"components"` (`{part: raw float32 (B,) tensor}`, logged by the trainer as `reward/<part>`),
        `"weights"` (`{part: weight}`), `"parts"` (`{part: that part's own metadata}`) and, when
        `normalize=True`, `"normalized"` (`{part: normalised float32 (B,) tensor}`).
    """

    name = "composite"

    def __init__(self, rewards: Mapping[str | Callable, float], normalize: bool = False, eps: float = 1e-6):
        if not isinstance(rewards, Mapping) or not rewards:
            raise TypeError(
                "`rewards` must be a non-empty dict mapping reward names or callables to weights, "
                "e.g. {'aesthetic': 1.0, 'clip_score': 10.0}."
            )
        from .registry import get_reward

        self.parts: dict[str, Callable] = {}
        self.weights: dict[str, float] = {}
        for key, weight in rewards.items():
            if isinstance(key, str):
                fn, base = get_reward(key), key
            elif callable(key):
                fn, base = key, _part_name(key)
            else:
                raise TypeError(f"`rewards` keys must be reward names or callables, got {type(key).__name__}.")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise TypeError(f"weight of reward {base!r} must be a number, got {weight!r}.") from None
            name, k = base, 0
            while name in self.parts:
                k += 1
                name = f"{base}_{k}"
            self.parts[name] = fn
            self.weights[name] = weight
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.stats = {name: _RunningStats() for name in self.parts}
        self._stats_lock = threading.Lock()

    def to(self, device=None):
        """Eagerly load every part that can be loaded (those with a `.to` method); returns `self`."""
        for fn in self.parts.values():
            if hasattr(fn, "to") and not isinstance(fn, torch.nn.Module):
                fn.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images, prompts, prompt_metadata=None):
        images = check_reward_inputs(images, prompts, prompt_metadata)
        batch, device = images.shape[0], images.device
        components, part_metadata, normalized = {}, {}, {}
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        for name, fn in self.parts.items():
            out = fn(images, prompts, prompt_metadata)
            raw, meta = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
            raw = as_reward_tensor(raw, batch, device, name)
            components[name], part_metadata[name] = raw, meta
            value = raw
            if self.normalize:
                with self._stats_lock:
                    stats = self.stats[name]
                    stats.update(raw)
                    mean, std = stats.mean, stats.std
                value = normalized[name] = (raw - mean) / (std + self.eps)
            total = total + self.weights[name] * value
        metadata = {"components": components, "weights": dict(self.weights), "parts": part_metadata}
        if self.normalize:
            metadata["normalized"] = normalized
        return total, metadata

    def __repr__(self):
        parts = ", ".join(f"{n!r}: {w}" for n, w in self.weights.items())
        return f"CompositeReward({{{parts}}}, normalize={self.normalize})"
