"""The reference policy of the DPO loss and the KL term: the base model, before any training."""

from __future__ import annotations

import contextlib
import copy

import torch


class ReferencePolicy:
    """
    The base model the policy is compared with.

    With LoRA it costs nothing: the adapter is switched off for the reference's forward passes. For full
    fine-tuning a frozen copy of the denoiser is taken before training starts — one more denoiser in memory, in
    the inference dtype (about 1.7 GB for SD1.5's UNet in fp16, 5 GB for SDXL's).

    Args:
        denoiser (`torch.nn.Module`): the pipeline's UNet or transformer (unwrapped).
        use_lora (`bool`): whether the denoiser trains a LoRA adapter.
        dtype (`torch.dtype`, *optional*): dtype of the frozen copy (full fine-tuning).
    """

    def __init__(self, denoiser, *, use_lora: bool, dtype=None):
        self.denoiser = denoiser
        self.use_lora = use_lora
        self.copy = None
        if not use_lora:
            self.copy = copy.deepcopy(denoiser).requires_grad_(False).eval()
            if dtype is not None:
                self.copy.to(dtype=dtype)

    @contextlib.contextmanager
    def active(self):
        """The reference denoiser, for use inside the block (with LoRA: the denoiser with its adapter off)."""
        if self.copy is not None:
            yield self.copy
            return
        self.denoiser.disable_adapters()
        try:
            with torch.no_grad():
                yield self.denoiser
        finally:
            self.denoiser.enable_adapters()
