"""Wall-clock time of the phases of a stage, reported in its statistics."""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    """Wall-clock seconds per named phase of a stage (after the device's queued work has finished)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def stats(self) -> dict[str, float]:
        return {f"time/{phase}": float(seconds) for phase, seconds in self.seconds.items()}
