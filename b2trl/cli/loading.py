"""What a command loads before it works — processes, model, prompts, rewards — each failure one line naming the flag.

The order matters for `start_processes` only: it runs before anything that would create accelerate's state.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .config_file import json_object
from .errors import fail, name_the_flag


def start_processes(config):
    """
    Create accelerate's process state from the config before anything else does: loading the pipeline would
    create a default one, which on a CPU-only machine is a single process however the command was launched.
    """
    from accelerate import PartialState

    state = PartialState(**({"cpu": True} if config.accelerator_kwargs.get("cpu") else {}))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        fail(
            f"launched as {launched} processes (WORLD_SIZE={launched}) but accelerate set up each as a single "
            f"process, so they would train {launched} separate models. On a machine without GPUs pass "
            "--accelerator_kwargs '{\"cpu\": true}' (gloo on CPU); with GPUs, check that every process sees one."
        )
    return state


def model_folder(model: str) -> str:
    """A shipped toy model's folder for its name (``toy``, ``toy-sd3``); any other model as given."""
    from ..toy import TOY_MODELS, model_path

    return model_path(TOY_MODELS[model]) if model in TOY_MODELS else model


def load_base_pipeline(model: str, *, revision: str = "main", use_lora: bool = True,
                       pretrained_vae: Optional[str] = None, flag: str = "--pretrained_model"):
    """[`~b2trl.load_pipeline`] of `model` (a toy name, Hub id or folder); a model that cannot be loaded stops the
    command with one line naming `flag` (or ``--pretrained_vae``)."""
    from ..models import load_pipeline

    try:
        return load_pipeline(model_folder(model), revision=revision, use_lora=use_lora, pretrained_vae=pretrained_vae)
    except (OSError, ValueError) as err:  # the Hub client's not-found errors are OSErrors
        is_vae = str(err).startswith("pretrained_vae")
        fail(f"{'--pretrained_vae' if is_vae else flag} {pretrained_vae if is_vae else model}: {err}")


def check_config_for_model(config, pipeline, fields: Sequence[str]) -> None:
    """
    What the config asks that this model cannot do, found before any sampling: its sampler's settings (a flow
    model's ``noise_level`` of 0), a method defined for another sampler, a resolution the VAE cannot make.
    """
    from ..methods import check_sampler
    from ..models import family_for_pipeline

    family = family_for_pipeline(pipeline)
    sampler = family.make_sampler(config)
    problems = list(sampler.validation_errors())
    try:
        check_sampler(config.method, sampler)
    except ValueError as err:
        problems.append(str(err))
    try:
        family.image_size(getattr(pipeline, "sd_pipeline", pipeline), config.resolution)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise SystemExit("\n".join(f"error: {name_the_flag(p, fields)}" for p in problems))


def read_prompts(prompts: Optional[Sequence[str]] = None, prompts_file: Optional[str] = None,
                 prompts_dataset: Optional[str] = None, split: str = "train", column: str = "prompt",
                 default: Sequence[str] = ()) -> list[str]:
    """
    Prompts from at most one of the three sources, else `default`; a source that cannot be read stops the command
    with one line naming its flag.

    Args:
        prompts (`Sequence[str]`, *optional*): given inline (``--prompts``).
        prompts_file (`str`, *optional*): a text file, one prompt per line (``--prompts_file``).
        prompts_dataset (`str`, *optional*): a `datasets` dataset (``--prompts_dataset``), its `split` and `column`.
        default (`Sequence[str]`, *optional*): the prompts when no source is given.
    """
    from ..prompts import PromptSourceError, load_prompts_dataset, read_prompts_file

    if len([s for s in (prompts, prompts_file, prompts_dataset) if s]) > 1:
        fail("give at most one of --prompts, --prompts_file, --prompts_dataset")
    try:
        if prompts_file:
            return read_prompts_file(prompts_file)
        if prompts_dataset:
            return load_prompts_dataset(prompts_dataset, split, column)
    except PromptSourceError as err:
        flags = {"source": "--prompts_file" if prompts_file else "--prompts_dataset",
                 "split": "--prompts_dataset_split", "column": "--prompts_dataset_column"}
        fail(f"{flags[err.field]} {err}")
    return list(prompts) if prompts else list(default)


def reward_kwargs_for(names: Sequence[str], reward_kwargs) -> dict[str, dict]:
    """
    Each reward's keyword arguments from `--reward_kwargs`: a JSON object for every reward, or one keyed by reward
    name (``{"clip_score": {"model_name_or_path": "..."}}``) when every key names one of the rewards.
    """
    if isinstance(reward_kwargs, str):
        try:
            reward_kwargs = json_object(reward_kwargs)
        except argparse.ArgumentTypeError as err:
            fail(f"--reward_kwargs: {err}")
    kwargs = dict(reward_kwargs or {})
    if len(names) > 1 and kwargs and all(k in names and isinstance(v, dict) for k, v in kwargs.items()):
        return {name: dict(kwargs.get(name, {})) for name in names}
    return {name: dict(kwargs) for name in names}


def build_reward(name: str, kwargs: dict, *, reward_model: Optional[str] = None):
    """`get_reward(name, **kwargs)` (a registered name or ``module:function``); failures name the flag."""
    from ..rewards import RewardModelNotFoundError, get_reward

    if ":" in name and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # 'module:function' may name a module in the working directory
    if reward_model:
        kwargs = {**kwargs, "model_name_or_path": reward_model}
    try:
        return get_reward(name, **kwargs)
    except RewardModelNotFoundError as err:
        flag = "--reward_model" if reward_model else f"--reward {name}"
        fail(f"{flag}: {err} (--reward_model sets model_name_or_path, --reward_kwargs the others)")
    except (ValueError, TypeError, ImportError) as err:
        fail(f"--reward {name}: {err}")
