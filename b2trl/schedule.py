"""The progressive interval schedule of B²-DiffuRL, and the windows of the methods built on the same rollout.

At stage ``k`` only an interval of ``L_k`` denoising steps of a ``T``-step trajectory is trained. B²'s own
(backward) schedule anchors it at the end: step indices ``[T - L_k, T)``, so ``b_k = T - L_k`` is the branch point
where the branches of a group fork and the interval grows from the end of the trajectory backwards. Anchored at
the start, the interval is ``[0, L_k)``: the branches fork at the initial noise, and each branch is finished by
an unrecorded suffix ``[L_k, T)``. ``L_k`` never shrinks, so either interval grows until it covers the whole
trajectory.

Two more anchors place a window of fixed length anywhere in the trajectory, as the GRPO methods for flow models
do: ``"sliding"`` (MixGRPO) moves it one step later every few stages and wraps around, ``"random"``
(Flow-GRPO-Fast) draws its first step anew each stage. The steps before the window are the shared prefix, the
steps after it the untrained suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class IntervalSchedule:
    r"""
    Which denoising steps are trained at each stage: how long the interval is, and where it sits.

    Two shapes are supported:

    - **linear** (default): ``L_k = min(T, initial_length + floor((T - initial_length + 1) * k / num_stages))``.
      With ``initial_length=14``, ``num_stages=100`` and ``T=20`` this is the reference schedule
      ``14 + floor(7k / 100)``: about 14 stages per length, the whole trajectory from stage 86 on.
      ``initial_length=1`` starts from the very last step (see [`IntervalSchedule.from_last_step`]).
    - **milestones**: ``milestones[i]`` is the first stage at which the interval is ``initial_length + i + 1``
      steps long (capped at ``T``). Stages must be strictly increasing.

    Stages past the end of the schedule keep the full trajectory.

    Where the interval sits is `anchor`: ``"end"`` (B²'s backward schedule, the default) trains steps
    ``[T - L_k, T)`` and branches at ``T - L_k``; ``"start"`` trains steps ``[0, L_k)``, branching at the initial
    noise, and finishes each branch without recording the remaining steps. Two anchors move a window of
    `initial_length` steps (its length never changes) and branch at its first step:

    - ``"sliding"`` (MixGRPO): the window starts at step 0 and moves one step later every `shift_every` stages;
      after starting at `window_max_start` it wraps around to step 0. Its first step at stage ``k`` is
      ``(k // shift_every) mod (window_max_start + 1)``.
    - ``"random"`` (Flow-GRPO-Fast): the first step is drawn uniformly from ``0 … window_max_start`` at every
      stage, by a generator seeded with ``(window_seed, k)``: the same stage draws the same window in every run and
      after a resume.

    `window_max_start` defaults to ``T - initial_length`` (the window may reach the last step).
    [`IntervalSchedule.interval`] returns ``(first_step, end_step)`` for every anchor.

    Parameters:
        initial_length (`int`, *optional*, defaults to `14`):
            Interval length at stage 0 (number of denoising steps trained).
        num_stages (`int`, *optional*, defaults to `100`):
            Number of stages over which the linear schedule grows to the whole trajectory.
        milestones (`list[int]` or `None`, *optional*, defaults to `None`):
            Explicit stages at which the interval grows by one step; replaces the linear shape when given.
        anchor (`str`, *optional*, defaults to `"end"`):
            ``"end"``: the interval ends at the last step and grows backwards (B²-DiffuRL). ``"start"``: it starts
            at step 0 and grows forwards; the steps after it finish each branch and are not trained.
            ``"sliding"``: a window of `initial_length` steps moving one step later every `shift_every` stages
            (MixGRPO). ``"random"``: a window of `initial_length` steps starting at a random step each stage
            (Flow-GRPO-Fast).
        shift_every (`int`, *optional*, defaults to `1`):
            ``"sliding"`` only: stages between two moves of the window.
        window_max_start (`int` or `None`, *optional*, defaults to `None`):
            ``"sliding"`` and ``"random"``: the last step a window may start at; `None` means
            ``T - initial_length``. Flow-GRPO-Fast keeps its window in the first half: ``T // 2 - initial_length``.
        window_seed (`int`, *optional*, defaults to `0`):
            ``"random"`` only: seed of the window draws (combined with the stage).
    """

    initial_length: int = field(
        default=14,
        metadata={"help": "Interval length at stage 0: how many denoising steps are trained."},
    )
    num_stages: int = field(
        default=100,
        metadata={"help": "Number of stages over which the linear schedule grows to the whole trajectory."},
    )
    milestones: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Explicit stages at which the interval grows by one step (strictly increasing); "
            "replaces the linear shape when given."
        },
    )

    ANCHORS = ("end", "start", "sliding", "random")
    WINDOWS = ("sliding", "random")  # the anchors whose interval is a window of fixed length

    anchor: str = field(
        default="end",
        metadata={
            "help": "Where the interval sits: 'end' (the last L_k steps, growing backwards: B²-DiffuRL), 'start' "
            "(the first L_k steps, growing forwards; the remaining steps finish each branch untrained), 'sliding' "
            "(a window of initial_length steps moving one step later every shift_every stages: MixGRPO) or "
            "'random' (a window of initial_length steps at a random start each stage: Flow-GRPO-Fast).",
            "choices": list(ANCHORS),
        },
    )
    shift_every: int = field(
        default=1, metadata={"help": "anchor='sliding': stages between two moves of the window (MixGRPO: 25)."}
    )
    window_max_start: Optional[int] = field(
        default=None,
        metadata={
            "help": "anchor='sliding'/'random': the last step a window may start at (default: T - initial_length; "
            "Flow-GRPO-Fast: T // 2 - initial_length, the first half)."
        },
    )
    window_seed: int = field(
        default=0, metadata={"help": "anchor='random': seed of the window draws (combined with the stage)."}
    )

    def __post_init__(self):
        if self.anchor not in self.ANCHORS:
            raise ValueError(
                f"IntervalSchedule.anchor must be one of {', '.join(map(repr, self.ANCHORS))}, got {self.anchor!r}: "
                "'end' trains the last steps (B²-DiffuRL's backward schedule), 'start' the first ones, 'sliding' and "
                "'random' a window of initial_length steps."
            )
        for name in ("initial_length", "num_stages", "shift_every", "window_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"IntervalSchedule.{name} must be an int, got {value!r}.")
        if self.initial_length < 1:
            raise ValueError(
                f"IntervalSchedule.initial_length must be >= 1 (at least the last step is trained), "
                f"got {self.initial_length}."
            )
        if self.num_stages < 1:
            raise ValueError(f"IntervalSchedule.num_stages must be >= 1, got {self.num_stages}.")
        if self.shift_every < 1:
            raise ValueError(f"IntervalSchedule.shift_every must be >= 1 (stages per move), got {self.shift_every}.")
        if self.window_max_start is not None:
            if isinstance(self.window_max_start, bool) or not isinstance(self.window_max_start, int):
                raise ValueError(f"IntervalSchedule.window_max_start must be an int, got {self.window_max_start!r}.")
            if self.window_max_start < 0:
                raise ValueError(
                    f"IntervalSchedule.window_max_start must be >= 0 (a step index), got {self.window_max_start}."
                )
        if self.milestones is not None:
            milestones = [int(m) for m in self.milestones]
            if any(m < 0 for m in milestones):
                raise ValueError(f"IntervalSchedule.milestones must be non-negative stages, got {milestones}.")
            if any(b <= a for a, b in zip(milestones, milestones[1:])):
                raise ValueError(
                    f"IntervalSchedule.milestones must be strictly increasing stages, got {milestones}."
                )
            self.milestones = milestones

    @classmethod
    def from_last_step(cls, num_stages: int = 100) -> "IntervalSchedule":
        """A linear schedule that starts by training only the very last denoising step."""
        return cls(initial_length=1, num_stages=num_stages)

    def validate(self, num_steps: int) -> None:
        """Raise `ValueError` if this schedule cannot run on a `num_steps`-step trajectory."""
        if num_steps < 1:
            raise ValueError(f"sample_num_steps must be >= 1, got {num_steps}.")
        if self.initial_length > num_steps:
            raise ValueError(
                f"IntervalSchedule.initial_length ({self.initial_length}) is longer than the trajectory "
                f"(sample_num_steps={num_steps}); use initial_length <= {num_steps}."
            )
        if self.anchor in self.WINDOWS and self.window_max_start is not None:
            latest = num_steps - self.initial_length
            if self.window_max_start > latest:
                raise ValueError(
                    f"IntervalSchedule.window_max_start ({self.window_max_start}) would let a window of "
                    f"{self.initial_length} steps run past the last of {num_steps} steps; use window_max_start <= "
                    f"{latest} (or None for exactly that)."
                )

    def max_start(self, num_steps: int) -> int:
        """The last step a sliding or random window may start at on a `num_steps`-step trajectory."""
        return num_steps - self.initial_length if self.window_max_start is None else self.window_max_start

    def length(self, stage: int, num_steps: int) -> int:
        """Interval length ``L_k`` at `stage` for a `num_steps`-step trajectory."""
        self.validate(num_steps)
        if stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}.")
        if self.anchor in self.WINDOWS:
            return self.initial_length
        if self.milestones is not None:
            grown = sum(1 for m in self.milestones if m <= stage)
            return min(num_steps, self.initial_length + grown)
        increments = num_steps - self.initial_length + 1
        return min(num_steps, self.initial_length + (increments * stage) // self.num_stages)

    def interval(self, stage: int, num_steps: int) -> tuple[int, int]:
        """The trained steps at `stage` as ``(first_step, end_step)``: step indices ``[first_step, end_step)``.
        Branches fork at ``first_step``; steps from ``end_step`` on finish each branch and are not trained."""
        length = self.length(stage, num_steps)
        if self.anchor == "start":
            return 0, length
        if self.anchor == "sliding":
            first = (stage // self.shift_every) % (self.max_start(num_steps) + 1)
            return first, first + length
        if self.anchor == "random":
            first = int(np.random.default_rng([self.window_seed, stage]).integers(0, self.max_start(num_steps) + 1))
            return first, first + length
        return num_steps - length, num_steps

    def branch_point(self, stage: int, num_steps: int) -> int:
        """Index of the first trained step (``b_k = T - L_k`` for the backward schedule): where branches fork."""
        return self.interval(stage, num_steps)[0]

    def lengths(self, num_steps: int, num_stages: Optional[int] = None) -> list[int]:
        """Interval lengths for stages ``0 .. num_stages - 1`` (defaults to this schedule's `num_stages`)."""
        count = self.num_stages if num_stages is None else num_stages
        return [self.length(k, num_steps) for k in range(count)]

    def to_dict(self) -> dict:
        return {"initial_length": self.initial_length, "num_stages": self.num_stages, "milestones": self.milestones,
                "anchor": self.anchor, "shift_every": self.shift_every, "window_max_start": self.window_max_start,
                "window_seed": self.window_seed}
