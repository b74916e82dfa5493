"""The reference policy of the DPO loss and the KL term: the base model, before any training."""

from __future__ import annotations

import contextlib
import copy

import torch

from .. import batching
from ..models import Conditioning
from ..quiet import hide_known_warnings


class ReferencePolicy:
    """
    The base model the policy is compared with.

    With LoRA it costs nothing: the adapter is switched off for the reference's forward passes. For full
    fine-tuning a frozen copy of the denoiser is taken before training starts — one more denoiser in memory, in
    the inference dtype (about 1.7 GB for SD1.5's UNet in fp16, 5 GB for SDXL's); with FSDP2 sharding, a shard
    of it on each process.

    Args:
        denoiser (`torch.nn.Module`): the pipeline's UNet or transformer (unwrapped).
        use_lora (`bool`): whether the denoiser trains a LoRA adapter.
        dtype (`torch.dtype`, *optional*): dtype of the frozen copy (full fine-tuning).
        shard (`Callable[[torch.nn.Module], torch.nn.Module]`, *optional*): shards the frozen copy in place (FSDP2,
            [`~b2trl.sharding.FSDP2Sharding.shard`]), so that each process holds a shard of it; pass an unsharded
            `denoiser`.
    """

    def __init__(self, denoiser, *, use_lora: bool, dtype=None, shard=None):
        self.denoiser = denoiser
        self.use_lora = use_lora
        self.copy = None
        if not use_lora:
            self.copy = copy.deepcopy(denoiser).requires_grad_(False).eval()
            if dtype is not None:
                with hide_known_warnings():
                    self.copy.to(dtype=dtype)
            if shard is not None:
                shard(self.copy)

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

    @torch.no_grad()
    def evaluate(self, kept, family, sampler, scheduler, guidance_scale, *, chunk_size, predictions=False,
                 negative=None) -> dict:
        """
        The reference's view of a stage's kept transitions (``(rows, L)`` layout, as sampled): ``ref_log_probs``
        ``(rows, L)``, and with `predictions` its guided prediction per step, ``ref_predictions``, for the KL
        term. `chunk_size` bounds the (row, step) pairs per denoiser call; `negative` is the unconditional half of
        guidance, one row for every transition.
        """
        rows, num_steps = kept["timesteps"].shape
        flat = batching.stack_steps(kept, slice(0, num_steps))
        conditioning = Conditioning.from_rows(flat, negative)
        log_probs, outputs = [], []
        with self.active() as denoiser:
            for start in range(0, rows * num_steps, chunk_size):
                part = slice(start, min(start + chunk_size, rows * num_steps))
                latents, timesteps = flat["latents"][part], flat["timesteps"][part]
                prediction = family.predict(denoiser, latents, timesteps, conditioning.index(part), guidance_scale)
                step = sampler.step(scheduler, prediction, timesteps, latents, prev_sample=flat["next_latents"][part])
                log_probs.append(step.log_prob)
                outputs.append(prediction if predictions else None)
        out = {"ref_log_probs": torch.cat(log_probs).reshape(rows, num_steps)}
        if predictions:
            out["ref_predictions"] = torch.cat(outputs).reshape(rows, num_steps, *outputs[0].shape[1:])
        return out
