"""The memory and speed fields of the configuration: gradient checkpointing, stacked training steps,
compilation, FSDP2 sharding and the EMA of the weights. [`B2DiffuRLConfig`] takes them from [`ScaleFields`]; they
are documented with the other fields in its docstring, and [`scale_errors`] checks them."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sharding import fsdp_config_errors

# what compile_unet_kwargs may hold: torch.compile's keyword arguments
COMPILE_ARGUMENTS = ("backend", "dynamic", "fullgraph", "mode", "options", "disable")


@dataclass
class ScaleFields:
    """The memory and speed fields of [`B2DiffuRLConfig`] (see its docstring)."""

    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the denoiser's activations in the backward pass instead of storing them: much less "
            "training memory (SDXL at 1024 px needs it on most GPUs) for about a third more training time."
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Full fine-tuning sharded with FSDP2: each process holds a shard of the denoiser's parameters, "
            "gradients and optimizer state. Also on under `accelerate launch --use_fsdp --fsdp_version 2`."
        },
    )
    fsdp_kwargs: dict = field(
        default_factory=dict,
        metadata={
            "help": "FSDP2 options as a JSON object (b2trl.sharding.FSDPOptions: reshard_after_forward, cpu_offload, "
            "transformer_cls_names_to_wrap, min_num_params, param_dtype, reduce_dtype, activation_checkpointing); "
            "they override the launcher's --fsdp_* settings."
        },
    )

    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Exponential moving average of the trained weights with this decay (0: off; Flow-GRPO: 0.9 "
            "every 8 steps). Kept in checkpoints, exported by save_pretrained(ema=True), used for evaluation."
        },
    )
    ema_update_every: int = field(default=1, metadata={"help": "Optimizer steps between two EMA updates."})
    ema_on_cpu: bool = field(
        default=False,
        metadata={"help": "Keep the EMA weights in CPU memory (for full fine-tuning of large models)."},
    )
    compile_unet: bool = field(
        default=False,
        metadata={
            "help": "Compile the UNet with torch.compile, in place (LoRA saving/loading and DDP are unchanged). "
            "Compilation takes minutes at the start; worth it for long GPU runs."
        },
    )
    compile_unet_kwargs: dict = field(
        default_factory=dict,
        metadata={
            "help": "torch.compile keyword arguments when compile_unet is set, as a JSON object, e.g. "
            '\'{"mode": "max-autotune-no-cudagraphs"}\'.'
        },
    )
    train_timesteps_per_forward: int = field(
        default=2,
        metadata={
            "help": "Interval steps of a training micro-batch stacked into one UNet forward/backward. Same gradient; "
            "activation memory grows with it (train_batch_size * this rows, doubled by CFG): set 1 if training runs "
            "out of memory. A micro-batch with fewer than train_batch_size samples stacks more steps, up to the same "
            "number of rows."
        },
    )


def scale_errors(config) -> list[str]:
    """Every problem with the memory and speed fields, one message each, naming the field and the fix."""
    errors = []
    if not isinstance(config.train_timesteps_per_forward, int) or config.train_timesteps_per_forward < 1:
        errors.append(f"train_timesteps_per_forward must be >= 1, got {config.train_timesteps_per_forward}.")
    if not isinstance(config.compile_unet_kwargs, dict):
        kind = type(config.compile_unet_kwargs).__name__
        errors.append(f"compile_unet_kwargs must be a dict of torch.compile arguments, got {kind}.")
    else:
        unknown = sorted(set(config.compile_unet_kwargs) - set(COMPILE_ARGUMENTS))
        if unknown:
            errors.append(
                f"compile_unet_kwargs has unknown torch.compile arguments {unknown}; use {COMPILE_ARGUMENTS}."
            )
    errors.extend(fsdp_config_errors(config))
    if not 0 <= config.ema_decay < 1:
        errors.append(f"ema_decay must be in [0, 1) (0 turns EMA off), got {config.ema_decay}.")
    if not isinstance(config.ema_update_every, int) or config.ema_update_every < 1:
        errors.append(f"ema_update_every must be >= 1, got {config.ema_update_every}.")
    return errors
