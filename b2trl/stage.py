"""One stage of training as one object: what the rollout recorded, the rewards, the advantages, the statistics.

[`B2DiffuRLTrainer.step`] passes a [`Stage`] from one named call to the next (sample → score → advantages →
train → log); each call returns a new stage with its part filled in instead of appending to lists it was handed.
After a stage, ``trainer.last_stage`` is the stage (its tensors released) for callbacks and debugging.

Two views live side by side. The recorded transitions, images and prompt metadata are **this process's**
samples. The rewards, normalised scores, keep mask and advantages are **every process's**, gathered once per
stage, as flat arrays in sample order: process-major, then prompt-major, branch-minor (sample ``i`` of group
``g`` on process ``p`` is at ``p * samples_per_process + g * num_branches + i``). Every process computes the same
advantages from them, and [`Stage.local`] takes its own rows back out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .advantages import StageRewards


class SampleBatch(list):
    """
    One sampling batch as the reward function and the image hook see it: a list that unpacks like TRL's
    ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` (the last two once the batch is scored),
    with those names as attributes.
    """

    FIELDS = ("images", "prompts", "prompt_metadata", "rewards", "reward_metadata")

    def _field(self, index: int):
        if len(self) <= index:
            raise AttributeError(f"this batch has no {self.FIELDS[index]} yet (it has not been scored)")
        return self[index]

    images = property(lambda self: self._field(0))
    prompts = property(lambda self: self._field(1))
    prompt_metadata = property(lambda self: self._field(2))
    rewards = property(lambda self: self._field(3))
    reward_metadata = property(lambda self: self._field(4))


@dataclass
class Stage:
    """
    Everything stage `index` produced.

    Attributes:
        index: the stage (TRL's epoch).
        interval: ``(first_step, end_step)``: the recorded, trained steps ``[first_step, end_step)``.
        num_branches: samples per group (branches of one prompt's rollout).
        process_index, num_processes: which process holds the local tensors, of how many.
        transitions: this process's recorded interval in TRL's DDPO layout, one row per sample:
            ``latents``, ``next_latents``, ``log_probs``, ``timesteps`` (time axis = interval steps) and the
            prompt's conditioning under ``cond.<name>`` keys.
        negative: the unconditional half of guidance, **one** row for the whole stage (`None` without guidance);
            micro-batches expand it instead of storing a copy per row.
        prompts, prompt_metadata: this process's, one per sample.
        images: this process's decoded images ``(samples, 3, H, W)`` in ``[0, 1]``.
        batch_sizes: samples per sampling batch (the reward function is called once per batch).
        reward_metadata: the reward function's metadata, one per sampling batch of this process.
        all_prompts: every process's prompts, one per sample.
        rewards: every process's rewards, float64, NaN for a dropped sample.
        reward_components: for a reward made of parts, each part's rewards (every process's).
        reward_weights: each part's weight, as the reward reported it.
        scores, keep, advantages: every process's normalised scores, keep mask and advantages (the rule's).
        stats: what is logged for the stage.
    """

    index: int
    interval: tuple[int, int]
    num_branches: int
    transitions: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    negative: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)
    prompts: tuple[str, ...] = ()
    prompt_metadata: tuple[Any, ...] = ()
    images: Optional[torch.Tensor] = field(default=None, repr=False)
    batch_sizes: tuple[int, ...] = ()
    process_index: int = 0
    num_processes: int = 1
    reward_metadata: tuple[Any, ...] = field(default=(), repr=False)
    all_prompts: tuple[str, ...] = ()
    rewards: Optional[np.ndarray] = None
    reward_components: dict[str, np.ndarray] = field(default_factory=dict)
    reward_weights: dict[str, float] = field(default_factory=dict)
    scores: Optional[np.ndarray] = None
    keep: Optional[np.ndarray] = None
    advantages: Optional[np.ndarray] = None
    stats: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes) -> "Stage":
        """A copy with `changes` (the unchanged tensors are shared, not copied)."""
        return dataclasses.replace(self, **changes)

    def with_stats(self, **stats) -> "Stage":
        """A copy whose statistics also hold `stats`."""
        return self.replace(stats={**self.stats, **stats})

    # ------------------------------------------------------------------ shapes

    @property
    def samples_per_process(self) -> int:
        return len(self.prompts)

    @property
    def local_rows(self) -> slice:
        """This process's samples within the gathered arrays."""
        n = self.samples_per_process
        return slice(self.process_index * n, (self.process_index + 1) * n)

    def local(self, values: np.ndarray) -> np.ndarray:
        """This process's part of a gathered flat array (e.g. ``stage.local(stage.advantages)``)."""
        return np.asarray(values)[self.local_rows]

    def groups(self, values: np.ndarray) -> np.ndarray:
        """A flat per-sample array as ``(groups, num_branches)``."""
        return np.asarray(values).reshape(-1, self.num_branches)

    def per_process(self, values: np.ndarray) -> np.ndarray:
        """A flat per-sample array as ``(num_processes, samples_per_process)``."""
        return np.asarray(values).reshape(self.num_processes, -1)

    # ------------------------------------------------------------------ views for the user's functions

    def batches(self) -> list[SampleBatch]:
        """This process's samples as one ``[images, prompts, prompt_metadata]`` batch per sampling batch: what
        the reward function is called with."""
        out, start = [], 0
        for size in self.batch_sizes:
            rows = slice(start, start + size)
            out.append(SampleBatch([self.images[rows], self.prompts[rows], self.prompt_metadata[rows]]))
            start += size
        return out

    def scored_batches(self) -> list[SampleBatch]:
        """The batches with their rewards and reward metadata (TRL's ``prompt_image_data`` for the image hook)."""
        rewards = torch.as_tensor(self.local(self.rewards), dtype=torch.float32)
        out, start = [], 0
        for batch, metadata in zip(self.batches(), self.reward_metadata):
            size = len(batch.prompts)
            out.append(SampleBatch([*batch, rewards[start : start + size], metadata]))
            start += size
        return out

    def reward_inputs(self) -> StageRewards:
        """The gathered rewards as the advantage rule takes them, ``(groups, branches)``."""
        return StageRewards(
            rewards=self.groups(self.rewards),
            prompts=self.all_prompts,
            components={name: self.groups(v) for name, v in self.reward_components.items()},
            weights=dict(self.reward_weights),
        )

    def released(self) -> "Stage":
        """This stage without its tensors (transitions, images): what is kept after the stage ends."""
        return self.replace(transitions={}, images=None, negative=None)
