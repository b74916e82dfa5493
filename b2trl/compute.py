"""What a run has spent, counted the same way for every method: denoiser rows and seconds.

A *row* is one sample through the denoiser at one step; classifier-free guidance runs two (the unconditional and
the conditional half). Sampling and the reference policy's passes are forward rows. A training row is a forward
and a backward pass, counted as `TRAINING_ROW_COST` forward rows: the ratio of a forward+backward call to a no-grad
forward of the same rows, measured with `benchmarks/row_cost.py` on a 2-core CPU for both shipped toy models with
their LoRA adapter, at the study's training micro-batch (32 rows): 2.29–2.39 for the SD toy's UNet and 2.27–2.43 for
the flow toy's transformer over two runs (benchmarks/results/row_cost_cpu.json). Gradient checkpointing adds
another forward (about one more row). `benchmarks/cost.py` recounts the rows with a hook on the denoiser and checks
this counter. Seconds are the wall time of sampling, rewards and training.
"""

from __future__ import annotations

# a training row (forward + backward) in forward-row equivalents, measured by benchmarks/row_cost.py
TRAINING_ROW_COST = 2.4

KINDS = ("sampling", "reference", "training")


class ComputeCounter:
    """Cumulative denoiser rows per kind and seconds of a run (kept in checkpoints, so a resumed run counts on)."""

    def __init__(self):
        self.rows = {kind: 0 for kind in KINDS}
        self.seconds = 0.0

    def add(self, kind: str, rows: int) -> None:
        if kind not in self.rows:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        self.rows[kind] += int(rows)

    @property
    def forward_rows(self) -> float:
        """Every row so far in forward-row equivalents."""
        return self.rows["sampling"] + self.rows["reference"] + TRAINING_ROW_COST * self.rows["training"]

    def stats(self) -> dict[str, float]:
        return {
            "compute/denoiser_rows": self.forward_rows,
            **{f"compute/{kind}_rows": rows for kind, rows in self.rows.items()},
            "compute/seconds": round(self.seconds, 3),
        }

    def state_dict(self) -> dict:
        return {"rows": dict(self.rows), "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.rows = {kind: int(state["rows"].get(kind, 0)) for kind in KINDS}
        self.seconds = float(state["seconds"])
