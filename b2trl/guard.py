"""The collapse guard's bookkeeping: the best evaluation so far, the evaluation-drop test, and what has fired.

A run collapses through a loop (docs/toy_world.md, "Skewed rewards"): best/worst selection keeps mostly failures,
the update pushes likelihoods down, more samples fail. Two signals see it coming: the skew watch
([`~b2trl.scoring.NegativeSkewWatch`]) on the kept samples' advantages, and an evaluation that falls more than
`collapse_tolerance` below the best one. [`CollapseGuard`] holds the decisions, from numbers every process has
alike, so that every process decides the same; the trainer acts on them (`on_collapse`: warn, stop or roll back).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class CollapseEvent:
    """
    One firing of the guard.

    Attributes:
        stage: the stage after which it fired.
        trigger: ``"skew"`` (the skew watch), ``"eval_drop"`` (an evaluation below the best by more than the
            tolerance) or both, joined by ``"+"``.
        action: what the trainer did: ``"warn"``, ``"stop"`` or ``"rollback"``.
        message: the message that was logged.
        restored_stage: for a rollback, the stage of the best checkpoint restored (`None` when there was none yet).
    """

    stage: int
    trigger: str
    action: str
    message: str
    restored_stage: Optional[int] = None


class CollapseGuard:
    """
    The best evaluation of a run and the events of its collapse guard.

    Args:
        mode (`str`): `on_collapse`: ``"warn"``, ``"stop"`` or ``"rollback"``.
        metric (`str`): the metric that decides (``"eval/<reward>"``).
        greater_is_better (`bool`, *optional*, defaults to `True`): the metric's direction.
        tolerance (`float`, *optional*): how far below the best an evaluation may fall before it counts as a
            collapse; `None`: evaluations never do.
    """

    def __init__(self, mode: str, metric: str, greater_is_better: bool = True, tolerance: Optional[float] = None):
        self.mode, self.metric = mode, metric
        self.greater_is_better, self.tolerance = greater_is_better, tolerance
        self.best_value: Optional[float] = None
        self.best_stage: Optional[int] = None
        self.events: list[CollapseEvent] = []
        self.stopped: Optional[CollapseEvent] = None
        self.rollbacks = 0

    def _gain(self, value: float, reference: float) -> float:
        """How much better `value` is than `reference` in the metric's direction."""
        return value - reference if self.greater_is_better else reference - value

    def improves(self, value: Optional[float]) -> bool:
        """Whether `value` beats the best so far (the first finite value does; NaN never does)."""
        if value is None or not math.isfinite(value):
            return False
        return self.best_value is None or self._gain(value, self.best_value) > 0

    def set_best(self, stage: int, value: float) -> None:
        self.best_stage, self.best_value = stage, float(value)

    def drop(self, value: Optional[float]) -> Optional[float]:
        """How far `value` is below the best when that is more than the tolerance (a NaN evaluation always is);
        `None` otherwise."""
        if self.tolerance is None or self.best_value is None or value is None:
            return None
        if not math.isfinite(value):
            return math.inf
        fall = -self._gain(value, self.best_value)
        return fall if fall > self.tolerance else None

    def drop_message(self, value: float, fall: float) -> str:
        """What an evaluation drop is, for the guard's message."""
        return (f"{self.metric} = {value:.4f}, {fall:.4f} below the best ({self.best_value:.4f} after stage "
                f"{self.best_stage}), more than collapse_tolerance={self.tolerance}")

    def record(self, event: CollapseEvent) -> CollapseEvent:
        self.events.append(event)
        if event.action == "stop":
            self.stopped = event
        if event.action == "rollback":
            self.rollbacks += 1
        return event

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_stage": self.best_stage, "rollbacks": self.rollbacks,
                "events": [asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_stage = state.get("best_value"), state.get("best_stage")
        self.rollbacks = int(state.get("rollbacks", 0))
        self.events = [CollapseEvent(**e) for e in state.get("events", [])]
