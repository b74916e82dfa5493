"""The backward progressive interval schedule of B²-DiffuRL.

At stage ``k`` only the last ``L_k`` denoising steps of a ``T``-step trajectory are trained: step indices
``[T - L_k, T)``. ``b_k = T - L_k`` is the branch point where the branches of a group fork. ``L_k`` never
shrinks, so the trained interval grows from the end of the trajectory backwards until it covers all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class IntervalSchedule:
    r"""
    How long the trained interval of final denoising steps is at each stage.

    Two shapes are supported:

    - **linear** (default): ``L_k = min(T, initial_length + floor((T - initial_length + 1) * k / num_stages))``.
      With ``initial_length=14``, ``num_stages=100`` and ``T=20`` this is the reference schedule
      ``14 + floor(7k / 100)``: about 14 stages per length, the whole trajectory from stage 86 on.
      ``initial_length=1`` starts from the very last step (see [`IntervalSchedule.from_last_step`]).
    - **milestones**: ``milestones[i]`` is the first stage at which the interval is ``initial_length + i + 1``
      steps long (capped at ``T``). Stages must be strictly increasing.

    Stages past the end of the schedule keep the full trajectory.

    Parameters:
        initial_length (`int`, *optional*, defaults to `14`):
            Interval length at stage 0 (number of final denoising steps trained).
        num_stages (`int`, *optional*, defaults to `100`):
            Number of stages over which the linear schedule grows to the whole trajectory.
        milestones (`list[int]` or `None`, *optional*, defaults to `None`):
            Explicit stages at which the interval grows by one step; replaces the linear shape when given.
    """

    initial_length: int = field(
        default=14,
        metadata={"help": "Interval length at stage 0: how many final denoising steps are trained."},
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

    def __post_init__(self):
        for name in ("initial_length", "num_stages"):
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

    def length(self, stage: int, num_steps: int) -> int:
        """Interval length ``L_k`` at `stage` for a `num_steps`-step trajectory."""
        self.validate(num_steps)
        if stage < 0:
            raise ValueError(f"stage must be >= 0, got {stage}.")
        if self.milestones is not None:
            grown = sum(1 for m in self.milestones if m <= stage)
            return min(num_steps, self.initial_length + grown)
        increments = num_steps - self.initial_length + 1
        return min(num_steps, self.initial_length + (increments * stage) // self.num_stages)

    def branch_point(self, stage: int, num_steps: int) -> int:
        """Index of the first trained step, ``b_k = T - L_k``: where the branches fork."""
        return num_steps - self.length(stage, num_steps)

    def lengths(self, num_steps: int, num_stages: Optional[int] = None) -> list[int]:
        """Interval lengths for stages ``0 .. num_stages - 1`` (defaults to this schedule's `num_stages`)."""
        count = self.num_stages if num_stages is None else num_stages
        return [self.length(k, num_steps) for k in range(count)]

    def to_dict(self) -> dict:
        return {"initial_length": self.initial_length, "num_stages": self.num_stages, "milestones": self.milestones}
