"""What the benchmark scripts share: the machine description they record, atomic JSON writes, a fresh accelerate
state per run, TRL's `DDPOTrainer` built quietly and split into timed phases, the toy model, and seeded prompt and
reward functions.

The scripts import this module as a sibling (``import common``), so it runs from a checkout without installing
anything beyond b2trl.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import warnings
from pathlib import Path
from typing import Callable, ContextManager

# The calls one stage consists of, by phase (named as B²-DiffuRL's stage statistics name them: ``time/<phase>``).
# B²-DiffuRL: the trainer's public named steps, the ones its own phase timer times in `step()`.
B2_PHASES = {"sample_stage": "sampling", "score": "rewards", "train_stage": "training"}
# TRL 0.23.1's DDPOTrainer: private methods, as it offers no public step or timing to read them from.
DDPO_PHASES = {"_generate_samples": "sampling", "compute_rewards": "rewards", "_train_batched_samples": "training"}


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return name
    return names[0] if names else name


def machine_description(device: str | None = None, packages=("torch", "diffusers", "trl"), *,
                        shared_cpu: bool = False) -> dict:
    """
    The machine and library versions a benchmark ran with, for its report.

    Args:
        device: recorded when given (with the GPU's name on ``"cuda"``).
        packages: the libraries whose versions are recorded (after Python's).
        shared_cpu: also record the CPUs this process may use, the 1-minute load average and the OS: a long CPU
            run on a machine shared with other jobs is slowed by them, and its report says by how much.
    """
    import importlib

    import torch

    info = {} if device is None else {"device": device}
    info.update(cpu=cpu_name(), cpu_count=os.cpu_count())
    if shared_cpu:
        info["cpus_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    if shared_cpu:
        info["load_average_at_start"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    info["python"] = platform.python_version()
    info.update({name: importlib.import_module(name).__version__ for name in packages})
    if shared_cpu:
        info["system"] = f"{platform.system()} {platform.machine()}"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def reset_accelerate_state() -> None:
    """Forget accelerate's process state, so that the next trainer in this process starts as in a new process
    (B²-DiffuRL's and TRL's accelerators differ in gradient accumulation, and the first one's would stay)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def quiet_ddpo_trainer(config, reward_fn, prompt_fn, pipeline):
    """
    TRL's `DDPOTrainer`, the baseline, built without its deprecation warning (the benchmarks use it on purpose)
    and with the pipeline's progress bars off.
    """
    from trl import DDPOTrainer

    from b2trl.accelerator import ensure_accelerate_state

    ensure_accelerate_state()  # TRL 0.23.1 logs through accelerate before it creates the state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DDPOTrainer is deprecated")
        trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    return trainer


def run_in_phases(trainer, phase: Callable[[str], ContextManager]) -> None:
    """
    Run each of a trainer's sampling, reward and training calls inside ``phase(name)`` (a context-manager factory,
    e.g. a `b2trl.timing.PhaseTimer` or a cost meter's phase), with the phase names of `B2_PHASES`.

    For TRL's `DDPOTrainer` this is the only way to split its `step()` into phases: its methods (`DDPO_PHASES`)
    are wrapped on the instance. B²-DiffuRL's stages report their own ``time/<phase>`` seconds; wrapping its named
    steps (`B2_PHASES`) is only needed to charge other measurements (model calls, memory) to a phase.
    """
    from trl import DDPOTrainer

    from b2trl import B2DiffuRLTrainer

    if isinstance(trainer, B2DiffuRLTrainer):
        methods = B2_PHASES
    elif isinstance(trainer, DDPOTrainer):
        methods = DDPO_PHASES
    else:
        raise TypeError(f"no phases known for a {type(trainer).__name__}")
    for attribute, name in methods.items():
        original = getattr(trainer, attribute)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            with phase(_name):
                return _original(*args, **kwargs)

        setattr(trainer, attribute, wrapped)


def toy_pipeline(kind: str = "sd"):
    """A shipped toy-world model (`"sd"` or the flow model `"sd3"`) with a fresh LoRA adapter."""
    import b2trl.toy as toy
    from b2trl import load_pipeline

    return load_pipeline(toy.model_path(kind), use_lora=True)


def seeded_prompts(prompts, seed: int):
    """A prompt function drawing from `prompts` with its own seeded generator: the same sequence on every run."""
    rng = random.Random(seed)
    prompts = list(prompts)
    return lambda: (rng.choice(prompts), {})


def random_reward(seed: int):
    """
    A reward function of seeded random scores that ignore the images: a random-weight model's images carry no
    signal, and B²-DiffuRL's selection (hence what it trains, and its cost) needs rewards that differ within a
    group.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    return lambda images, prompts, metadata: (torch.rand(images.shape[0], generator=generator), {})


def _clean(value):
    """JSON-safe copy: NaN/inf become None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path, obj) -> None:
    """Write `obj` as JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1))
    os.replace(tmp, path)
