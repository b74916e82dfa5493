"""Sharded full fine-tuning with FSDP2: the denoiser's parameters, gradients and optimizer state split over the
processes with torch's `fully_shard`.

b2trl applies FSDP2 itself instead of handing the denoiser to `accelerator.prepare`: accelerate's FSDP plugin is
not available to CPU processes (gloo), and the trainer samples through the denoiser outside any training wrapper.
One code path therefore serves torchrun on CPUs (where the tests run it) and GPUs. accelerate's own FSDP settings
(``accelerate launch --use_fsdp --fsdp_version 2``, an accelerate config file) switch it on and are read; the
model, its optimizer and the checkpoints never go through accelerate's FSDP code.

What it does:

- every block of a class the model names in ``_no_split_modules`` (or of the classes / size in the options) becomes
  one FSDP unit, then the whole denoiser: a forward call gathers one block's parameters at a time, so sampling
  (under `torch.no_grad`, in eval mode) and training run through the same sharded module;
- gradients are reduce-scattered after every backward pass, micro-batches included, so a process never holds
  more than its shard of the gradients (FSDP2's "no sync" mode would accumulate whole gradients instead);
- checkpoints hold the sharded model, optimizer state and EMA, written by every process with
  `torch.distributed.checkpoint` (``<checkpoint>/sharded_state``);
- the export gathers the whole weights on the main process, which writes the pipeline diffusers loads.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from accelerate import logging

logger = logging.get_logger(__name__)

SHARDED_STATE = "sharded_state"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class FSDPOptions:
    """
    How the denoiser is sharded (`B2DiffuRLConfig.fsdp_kwargs`, on top of accelerate's FSDP settings when the run
    was launched with them).

    Args:
        reshard_after_forward (`bool`, *optional*, defaults to `True`):
            Free each block's gathered parameters after its forward pass (gathered again for the backward pass).
            `False` keeps them until the backward pass: less communication, the whole model in memory
            (ZeRO-2-like).
        cpu_offload (`bool`, *optional*, defaults to `False`):
            Keep the parameter, gradient and optimizer shards in CPU memory (FSDP2's `CPUOffloadPolicy`); the
            optimizer then steps on the CPU.
        transformer_cls_names_to_wrap (`list[str]`, *optional*):
            Class names of the blocks that become FSDP units. Default: the model's ``_no_split_modules``
            (e.g. ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``).
        min_num_params (`int`, *optional*, defaults to `0`):
            When > 0, every submodule with more parameters than this becomes a unit instead (size-based wrapping).
        param_dtype (`str`, *optional*):
            dtype of the gathered parameters the blocks compute with: ``"bfloat16"`` or ``"float32"``. Default:
            the run's `mixed_precision` (bf16: ``"bfloat16"``; no: ``"float32"``). The shards, the optimizer
            and the exported weights stay float32.
        reduce_dtype (`str`, *optional*, defaults to `"float32"`):
            dtype in which gradients are reduce-scattered and accumulated.
        activation_checkpointing (`bool`, *optional*, defaults to `False`):
            Recompute activations in the backward pass (the denoiser's gradient checkpointing, as
            `gradient_checkpointing=True`).
    """

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    transformer_cls_names_to_wrap: Optional[list[str]] = None
    min_num_params: int = 0
    param_dtype: Optional[str] = None
    reduce_dtype: str = "float32"
    activation_checkpointing: bool = False

    @classmethod
    def from_plugin(cls, plugin) -> "FSDPOptions":
        """The options an accelerate `FullyShardedDataParallelPlugin` (built from ``accelerate launch`` flags or a
        config file) sets. Its mixed precision policy is not read: b2trl derives it from `mixed_precision`."""
        from torch.distributed.fsdp import CPUOffloadPolicy
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        size_based = policy is size_based_auto_wrap_policy and (plugin.min_num_params or 0) > 0
        names = plugin.transformer_cls_names_to_wrap
        state_dict_type = str(getattr(plugin, "state_dict_type", ""))
        if "FULL_STATE_DICT" in state_dict_type:
            logger.warning("fsdp_state_dict_type FULL_STATE_DICT is not read: b2trl's checkpoints are always sharded "
                           "(torch.distributed.checkpoint); save_pretrained writes the whole weights.")
        if getattr(plugin, "cpu_ram_efficient_loading", False):
            logger.warning("fsdp_cpu_ram_efficient_loading is not read: every process loads the pipeline before b2trl "
                           "shards its denoiser.")
        return cls(
            reshard_after_forward=bool(plugin.reshard_after_forward),
            cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            transformer_cls_names_to_wrap=([names] if isinstance(names, str) else list(names)) if names else None,
            min_num_params=int(plugin.min_num_params) if size_based else 0,
            activation_checkpointing=bool(plugin.activation_checkpointing),
        )


FSDP_OPTIONS = tuple(f.name for f in fields(FSDPOptions))


def fsdp_config_errors(config) -> list[str]:
    """Problems with a configuration's FSDP settings (`fsdp`, `fsdp_kwargs` and what FSDP2 sharding excludes), one
    message each."""
    errors = []
    kwargs = config.fsdp_kwargs
    if not isinstance(kwargs, dict):
        return [f"fsdp_kwargs must be a dict of FSDP options, got {type(kwargs).__name__}."]
    unknown = sorted(set(kwargs) - set(FSDP_OPTIONS))
    if unknown:
        errors.append(f"fsdp_kwargs has unknown options {unknown}; use {FSDP_OPTIONS}.")
    for name in ("param_dtype", "reduce_dtype"):
        if kwargs.get(name) is not None and kwargs[name] not in DTYPES:
            errors.append(f"fsdp_kwargs[{name!r}] must be one of {tuple(DTYPES)}, got {kwargs[name]!r}.")
    if kwargs.get("param_dtype") == "bfloat16" and config.mixed_precision != "bf16":
        errors.append(f"fsdp_kwargs['param_dtype']='bfloat16' needs mixed_precision='bf16' (got "
                      f"{config.mixed_precision!r}): the blocks compute with bf16 weights under its autocast.")
    if kwargs and not config.fsdp:
        errors.append("fsdp_kwargs is set but fsdp is False: set fsdp=True (--fsdp) to shard the denoiser.")
    if config.fsdp:
        errors.extend(sharded_run_errors(config))
    return errors


def sharded_run_errors(config) -> list[str]:
    """What a sharded run cannot combine with."""
    errors = []
    if config.mixed_precision == "fp16":
        errors.append("fsdp with mixed_precision='fp16' is not supported (FSDP2 would need a sharded gradient "
                      "scaler); use mixed_precision='bf16'.")
    if config.train_use_8bit_adam:
        errors.append("fsdp with train_use_8bit_adam=True is not supported: the optimizer steps on sharded "
                      "parameters (DTensors); use the default AdamW, whose state FSDP shards.")
    return errors


def _accelerate_plugin(accelerator):
    """accelerate's FSDP settings when the run was launched with them, else `None`. Refuses FSDP1."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"accelerate is set up for FSDP version {plugin.fsdp_version}; b2trl shards with FSDP2. Launch with "
            "`accelerate launch --use_fsdp --fsdp_version 2` (or `fsdp_version: 2` under fsdp_config in the "
            "accelerate config file)."
        )
    return plugin


def build_sharding(config, accelerator, *, use_lora: bool) -> Optional["FSDP2Sharding"]:
    """
    The run's FSDP2 sharding, or `None` when it is off. On when `config.fsdp` is set or the run was launched with
    accelerate's FSDP (version 2); `config.fsdp_kwargs` override the launcher's settings. `use_lora`: whether the
    pipeline trains LoRA (refused: sharding is for full fine-tuning).
    """
    plugin = _accelerate_plugin(accelerator)
    if plugin is None and not config.fsdp:
        return None
    if use_lora:
        raise ValueError(
            "fsdp shards full fine-tuning; this pipeline trains LoRA (use_lora=True), whose adapter is small enough "
            "to train with DDP. Load the pipeline with use_lora=False, or turn fsdp off."
        )
    errors = sharded_run_errors(config)
    if errors:
        raise ValueError("Invalid B2DiffuRLConfig:\n- " + "\n- ".join(errors))
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(
            "fsdp shards the denoiser over several processes, but this run has no process group: launch it with "
            "`accelerate launch` or `torchrun` (on CPUs with accelerator_kwargs={'cpu': True})."
        )
    options = FSDPOptions.from_plugin(plugin) if plugin is not None else FSDPOptions()
    overrides = dict(config.fsdp_kwargs)
    names = overrides.get("transformer_cls_names_to_wrap")
    if isinstance(names, str):  # as accelerate's flag takes them: comma-separated
        overrides["transformer_cls_names_to_wrap"] = [n.strip() for n in names.split(",") if n.strip()]
    return FSDP2Sharding(replace(options, **overrides), accelerator)


def fsdp_units(module: torch.nn.Module, options: FSDPOptions) -> list[torch.nn.Module]:
    """The submodules of `module` that become FSDP units under `options`, children before their parents: every
    module of a class named in `transformer_cls_names_to_wrap` (default: the model's ``_no_split_modules``), or
    with `min_num_params` > 0, every module with more parameters than that."""
    ordered = [m for m in reversed(list(module.modules())) if m is not module]
    if options.min_num_params > 0:
        return [m for m in ordered if sum(p.numel() for p in m.parameters()) > options.min_num_params]
    names = options.transformer_cls_names_to_wrap or list(getattr(module, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(module).__name__} names no blocks to shard (_no_split_modules); pass them as "
            "fsdp_kwargs={'transformer_cls_names_to_wrap': [...]} or set fsdp_kwargs['min_num_params']."
        )
    present = {type(m).__name__ for m in ordered}
    missing = sorted(set(names) - present)
    if options.transformer_cls_names_to_wrap and missing:
        raise ValueError(
            f"transformer_cls_names_to_wrap: {missing} are not classes of {type(module).__name__}'s modules "
            f"(it has e.g. {sorted(present)[:8]})."
        )
    return [m for m in ordered if type(m).__name__ in names]


class FSDP2Sharding:
    """
    Shards modules with FSDP2 over all processes (a one-dimensional mesh), and saves, loads and gathers what it
    sharded.

    Args:
        options ([`FSDPOptions`]): how to shard.
        accelerator (`accelerate.Accelerator`): the run's accelerator (device, processes, mixed precision).
    """

    def __init__(self, options: FSDPOptions, accelerator):
        from torch.distributed.device_mesh import init_device_mesh

        self.options = options
        self.accelerator = accelerator
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))

    # ------------------------------------------------------------------ sharding

    def policy(self):
        """`fully_shard`'s keyword arguments: the resharding, mixed precision and offload policies."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        default = {"bf16": "bfloat16"}.get(self.accelerator.mixed_precision, "float32")
        param_dtype = DTYPES[self.options.param_dtype or default]
        # the trainer runs every denoiser call under autocast, which picks each op's dtype; casting each block's
        # inputs instead would also round the rotary and timestep embeddings models pass their blocks in float32
        mixed = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                     reduce_dtype=DTYPES[self.options.reduce_dtype], cast_forward_inputs=False)
        return {
            "mesh": self.mesh,
            # the root too: a root kept whole after a no-grad forward would go stale once the optimizer steps
            "reshard_after_forward": self.options.reshard_after_forward,
            "mp_policy": mixed,
            "offload_policy": CPUOffloadPolicy() if self.options.cpu_offload else OffloadPolicy(),
        }

    def shard(self, module: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
        """Apply FSDP2 to `module` in place: each unit ([`fsdp_units`]), then the module itself (its
        remaining parameters). Its parameters become DTensor shards on this process's device. A `frozen` module
        (the reference copy) always frees its gathered parameters after a forward pass: no backward pass would.
        Returns `module`."""
        from torch.distributed.fsdp import fully_shard

        policy = self.policy()
        if frozen:
            policy["reshard_after_forward"] = True
        for unit in fsdp_units(module, self.options):
            fully_shard(unit, **policy)
        fully_shard(module, **policy)
        return module

    @staticmethod
    def reshard(module: torch.nn.Module) -> None:
        """Make sure every unit holds only its shards (before its parameters are read or written outside a
        forward pass)."""
        from torch.distributed.fsdp import FSDPModule

        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()

    # ------------------------------------------------------------------ training

    @staticmethod
    def no_sync(module):
        """Gradients are reduce-scattered after every backward pass, also inside an accumulation window: FSDP2's
        own no-sync mode would accumulate whole (unsharded) gradients on every process."""
        return contextlib.nullcontext()

    @staticmethod
    @torch.no_grad()
    def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
        """Clip the gradients of sharded `parameters` to a total 2-norm of `max_norm` (over every process's shards);
        returns the norm before clipping (a plain tensor, the same on every process)."""
        from torch.distributed.tensor import DTensor

        parameters = [p for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, folder: str, module, optimizer, ema=None) -> None:
        """
        Write `module`'s and `optimizer`'s shards (and the EMA's, when given) into ``folder/sharded_state`` with
        `torch.distributed.checkpoint`. Every process calls this. An optimizer that has not stepped yet is left
        out (reading its state would take an empty step, which counts in Adam's bias correction).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self.reshard(module)
        state = {"model": get_model_state_dict(module)}
        if optimizer.state:
            state["optimizer"] = get_optimizer_state_dict(module, optimizer)
        if ema is not None:
            state["ema"] = self._ema_tensors(module, ema)
        dcp.save(state, checkpoint_id=os.path.join(folder, SHARDED_STATE))

    def load_state(self, folder: str, module, optimizer, ema=None) -> None:
        """Load what [`FSDP2Sharding.save_state`] wrote into `module`, `optimizer` and `ema`, in place (on any number
        of processes). Every process calls this."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = os.path.join(folder, SHARDED_STATE)
        if not os.path.isdir(path):
            raise ValueError(
                f"{folder} holds no {SHARDED_STATE}/: it was written by a run without fsdp. Resume it without fsdp "
                "(or start this run from its exported weights)."
            )
        saved = {key.split(".")[0] for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
        self.reshard(module)
        state = {"model": get_model_state_dict(module)}
        if "optimizer" in saved:
            state["optimizer"] = get_optimizer_state_dict(module, optimizer)
        if ema is not None:
            if "ema" not in saved:
                raise ValueError(f"{folder} holds no EMA weights, but this run keeps an EMA (ema_decay > 0).")
            state["ema"] = self._ema_tensors(module, ema)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["model"])
        if "optimizer" in state:
            set_optimizer_state_dict(module, optimizer, state["optimizer"])
        if ema is not None:
            self._load_ema(module, ema, state["ema"])

    @staticmethod
    def _ema_tensors(module, ema) -> dict:
        """The EMA's local shards as DTensors laid out like their parameters, keyed by parameter name (what
        `torch.distributed.checkpoint` writes, and reads into in place)."""
        from torch.distributed.tensor import DTensor

        names = {id(p): n for n, p in module.named_parameters()}
        out = {"num_updates": torch.tensor(ema.num_updates)}
        for param, average in zip(ema.parameters, ema.average):
            if isinstance(param, DTensor):
                # on the parameter's device: an average kept on the CPU (ema_on_cpu) is copied there to be written
                local = average.to(param.to_local().device, copy=True)
                average = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                             shape=param.shape, stride=param.stride())
            out[names[id(param)]] = average
        return out

    @staticmethod
    @torch.no_grad()
    def _load_ema(module, ema, loaded: dict) -> None:
        from torch.distributed.tensor import DTensor

        names = {id(p): n for n, p in module.named_parameters()}
        for param, average in zip(ema.parameters, ema.average):
            value = loaded[names[id(param)]]
            average.copy_(value.to_local() if isinstance(value, DTensor) else value)
        ema.num_updates = int(loaded["num_updates"])

    # ------------------------------------------------------------------ export

    def full_state_dict(self, module) -> dict:
        """`module`'s whole weights, gathered shard by shard into CPU memory on the main process (an empty dict
        on the others). Every process calls this."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.reshard(module)
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_class(module) -> type:
    """The model class a module had before `fully_shard` (which swaps in an ``FSDP<Class>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def save_pipeline_with(pipe, denoiser_name: str, weights: dict, folder: str) -> None:
    """
    Write `pipe` with ``pipe.<denoiser_name>`` replaced by an unsharded model holding `weights` (a whole state
    dict), as ``<Pipeline>.from_pretrained(folder)`` loads it. The pipeline itself is left as it was.
    """
    from accelerate import init_empty_weights

    sharded = getattr(pipe, denoiser_name)
    with init_empty_weights():
        whole = unsharded_class(sharded).from_config(sharded.config)
    whole.load_state_dict(weights, assign=True)
    # set around the pipeline's __setattr__, which would re-register the component (and its class) in the config
    object.__setattr__(pipe, denoiser_name, whole)
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        object.__setattr__(pipe, denoiser_name, sharded)
