"""Shared builders for trainer tests: small configs, prompt and reward functions, script loading."""

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from b2trl import B2DiffuRLConfig, IntervalSchedule

PROMPTS = ("a cat", "a dog", "a red circle", "a blue square")


def small_config(**overrides) -> B2DiffuRLConfig:
    values = dict(
        num_epochs=2,
        sample_num_steps=6,
        sample_batch_size=2,
        sample_num_batches_per_epoch=2,
        num_branches=3,
        train_batch_size=2,
        train_gradient_accumulation_steps=2,
        interval_schedule=IntervalSchedule(initial_length=2, num_stages=4),
        # the tiny model's branches barely differ: the paper's rule keeps a branch on its own threshold, so that
        # most stages train; the default rule ("pairs", a gap of 1.0 between best and worst) often keeps none
        selection_rule="best_worst",
        mixed_precision="no",
        save_freq=0,
        seed=0,
    )
    values.update(overrides)
    return B2DiffuRLConfig(**values)


def cycling_prompts(prompts=PROMPTS):
    source = itertools.cycle(prompts)

    def prompt_fn():
        return next(source), {}

    return prompt_fn


def brightness_reward(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}


def lora_params(pipeline) -> dict:
    return {n: p.detach().clone() for n, p in pipeline.unet.named_parameters() if "lora" in n}


def max_change(before: dict, after: dict) -> float:
    return max(float((before[n] - after[n]).abs().max()) for n in before)


def constant_reward(images, prompts, metadata):
    return torch.full((images.shape[0],), 0.5), {}


def make_trainer(model_dir, reward=brightness_reward, hook=None, use_lora=True, **overrides):
    from b2trl import B2DiffuRLTrainer, load_pipeline

    pipeline = load_pipeline(model_dir, use_lora=use_lora)
    return B2DiffuRLTrainer(small_config(**overrides), reward, cycling_prompts(), pipeline, hook)


def load_script(path, name: str):
    """Import a script (an example or a benchmark) as module `name`; registered in sys.modules so that its
    dataclasses resolve their annotations."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


TRAIN_TINY = Path(__file__).parent / "scripts" / "train_tiny.py"


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun_tiny(model_dir, tmp_path, *extra, timeout=180) -> list[dict]:
    """Train `model_dir` with tests/scripts/train_tiny.py in two CPU processes (torchrun, gloo) and return the
    stats it wrote per stage. A run that does not finish in `timeout` seconds fails the test as a hang."""
    import pytest

    stats = Path(tmp_path) / "stats.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(TRAIN_TINY), str(model_dir), str(Path(tmp_path) / "project"), "--distributed", "--stats", str(stats),
           *extra]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"two-process training did not finish in {timeout} s (a hang)")
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in stats.read_text().splitlines()]
