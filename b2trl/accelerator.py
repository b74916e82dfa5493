"""Process state, the accelerator and compilation: what a training run sets up around its pipeline.

Loading a pipeline is [`b2trl.models.load_pipeline`] (it picks the model family).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState, logging
from accelerate.utils import ProjectConfiguration

from . import checkpoint as ckpt

logger = logging.get_logger(__name__)


def ensure_accelerate_state(**kwargs) -> PartialState:
    """
    Create accelerate's process state if nothing has yet.

    TRL's pipeline and trainer log through accelerate's logger, which raises "You must initialize the accelerate
    state" when no state exists. `kwargs` go to `PartialState` (e.g. ``cpu=True`` for gloo on CPU under torchrun).
    """
    return PartialState(**kwargs)


def build_accelerator(config) -> Accelerator:
    """
    The accelerator of a training run: its state created first (gloo on CPU when ``accelerator_kwargs`` has
    ``cpu``), fp16 refused on CPU, checkpoints named by stage, and no accumulation of its own (the trainer decides
    the windows per stage). Refuses a project folder that already holds another run's checkpoints.
    """
    ensure_accelerate_state(**({"cpu": True} if config.accelerator_kwargs.get("cpu") else {}))
    mixed_precision = config.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision='fp16' needs a GPU; training in fp32 on this CPU-only machine.")
        mixed_precision = "no"
    project = dict(config.project_kwargs)
    project.setdefault("project_dir", os.path.join(config.logdir, config.run_name or config.exp_name or "b2trl"))
    project.setdefault("total_limit", config.num_checkpoint_limit)
    # checkpoints are named by stage and written atomically here, not by accelerate's counter
    project["automatic_checkpoint_naming"] = False
    checkpoints = os.path.join(project["project_dir"], "checkpoints")
    if config.save_freq > 0 and not config.resume_from and ckpt.complete_checkpoints(checkpoints):
        # found now, not after a stage of work when the first checkpoint would collide
        raise ValueError(
            f"{checkpoints} already holds checkpoints of another run. Continue it with "
            "resume_from='latest', or use another project_dir (project_kwargs / output folder)."
        )
    # accumulation is decided per stage (the interval length and kept count change), so the
    # accelerator itself never accumulates
    return Accelerator(
        log_with=config.log_with,
        mixed_precision=mixed_precision,
        project_config=ProjectConfiguration(**project),
        gradient_accumulation_steps=1,
        **config.accelerator_kwargs,
    )


def compile_unet(unet, **compile_kwargs):
    """
    Compile the denoiser `unet` (a UNet or a transformer) with `torch.compile`, in place
    (`nn.Module.compile`), and return it.

    In place matters: the module object, its parameter names and its PEFT adapters stay as they were, so LoRA
    saving and loading, `accelerator.unwrap_model` and DDP wrapping see the same UNet as without compilation.
    Compilation happens at the first call of each new input shape and mode (no-grad sampling, training), which
    takes minutes for a Stable Diffusion UNet; it pays off over a long run on a GPU, rarely on a CPU.

    Args:
        unet (`torch.nn.Module`): The UNet (call after its LoRA adapter has been added).
        compile_kwargs: Passed to `torch.compile` (e.g. ``mode="max-autotune-no-cudagraphs"``, ``backend=...``).
    """
    unet.compile(**compile_kwargs)
    return unet

