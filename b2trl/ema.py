"""An exponential moving average of the trained weights (the evaluation weights Flow-GRPO and its successors use).

After every `update_every`-th optimizer step, each trained parameter's average moves towards it:
``ema ← decay · ema + (1 − decay) · θ``. Starting from the weights before training (``ema₀ = θ₀``), after ``k``
updates ``ema_k = decay^k · θ₀ + (1 − decay) · Σ_{i=1..k} decay^{k−i} · θ_i``. The average is kept in float32,
on the parameters' device or on the CPU (`on_cpu`), and costs one more copy of the trained parameters: a LoRA
adapter's few megabytes, or for full fine-tuning 4 bytes per parameter (SD1.5's UNet: 3.4 GB; FLUX.1's
transformer: 48 GB — keep that on the CPU). With FSDP2 sharding each process keeps the average of its own shards only.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


class ParameterEMA:
    """
    The moving average of a list of parameters.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`): the trained parameters (in the optimizer's order).
        decay (`float`): weight of the old average, in ``(0, 1)``.
        update_every (`int`, *optional*, defaults to `1`): optimizer steps between two updates.
        on_cpu (`bool`, *optional*, defaults to `False`): keep the average in CPU memory.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, update_every: int = 1,
                 on_cpu: bool = False):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) (0 turns EMA off), got {decay}.")
        if update_every < 1:
            raise ValueError(f"ema_update_every must be >= 1 optimizer steps, got {update_every}.")
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.on_cpu = on_cpu
        self.average = [self._copy(p) for p in self.parameters]
        self.num_updates = 0

    def _copy(self, param: torch.Tensor) -> torch.Tensor:
        param = _local(param)
        return param.detach().to(device="cpu" if self.on_cpu else param.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, optimizer_step: int) -> bool:
        """Called after optimizer step number `optimizer_step` (1-based); updates every `update_every` steps.
        Returns whether it updated."""
        if optimizer_step % self.update_every:
            return False
        for average, param in zip(self.average, self.parameters):
            value = _local(param).detach().to(device=average.device, dtype=torch.float32)
            average.mul_(self.decay).add_(value, alpha=1 - self.decay)
        self.num_updates += 1
        return True

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """Inside the block the parameters hold the average (in their own dtype); afterwards their trained values
        again. For evaluation, sampling and saving with the EMA weights."""
        local = [_local(p) for p in self.parameters]
        saved = [p.detach().clone() for p in local]
        try:
            for param, average in zip(local, self.average):
                param.copy_(average.to(device=param.device, dtype=param.dtype))
            yield self
        finally:
            for param, value in zip(local, saved):
                param.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "update_every": self.update_every, "num_updates": self.num_updates,
                "average": [a.cpu() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(
                f"the checkpoint's EMA holds {len(state['average'])} tensors, this model trains {len(self.average)}."
            )
        for average, saved in zip(self.average, state["average"]):
            average.copy_(saved.to(device=average.device, dtype=torch.float32))
        self.num_updates = int(state["num_updates"])


def _local(param: torch.Tensor) -> torch.Tensor:
    """A parameter's values on this process: the whole tensor, or an FSDP2-sharded parameter's local shard (a view
    that writes through to the parameter)."""
    to_local = getattr(param, "to_local", None)  # DTensor
    return to_local() if to_local is not None else param
