"""The configuration of evaluation during training, the best checkpoint and the collapse guard: the fields that
[`B2DiffuRLConfig`] takes from [`EvaluationFields`], their checks, and the names the metrics are logged under.
They are documented with the other fields in [`B2DiffuRLConfig`]'s docstring; docs/evaluation.md explains them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ON_COLLAPSE = ("warn", "stop", "rollback")
TRAINING_REWARD = "reward"  # the name that stands for the training reward in eval_rewards
EVAL_PREFIX = "eval/"


def metric_key(reward_name: str) -> str:
    """The logged name of an evaluation reward: ``eval/<name>``, or ``eval/<function>`` for
    ``"package.module:function"``."""
    short = reward_name.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ":" in reward_name else reward_name
    return EVAL_PREFIX + short


def eval_reward_names(config) -> list[str]:
    """The rewards an evaluation scores with, in order (the training reward when none is named)."""
    return list(config.eval_rewards) or [TRAINING_REWARD]


def best_metric_name(config) -> str:
    """`metric_for_best_model` with its ``eval/`` prefix, or the first evaluation reward's metric."""
    name = config.metric_for_best_model
    if not name:
        return metric_key(eval_reward_names(config)[0])
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def prompt_sources(config) -> dict:
    """The evaluation prompt sources that are set, by field name."""
    values = {"eval_prompts": config.eval_prompts, "eval_prompts_file": config.eval_prompts_file,
              "eval_prompts_dataset": config.eval_prompts_dataset}
    return {k: v for k, v in values.items() if v}


def evaluates(config) -> bool:
    """Whether training evaluates (``eval_every > 0``)."""
    return isinstance(config.eval_every, int) and config.eval_every > 0


def evaluation_errors(config) -> list[str]:
    """Every problem with the evaluation, best-checkpoint and guard fields, one message each naming the field and
    the fix."""
    errors = []
    on = evaluates(config)
    if isinstance(config.eval_every, bool) or not isinstance(config.eval_every, int) or config.eval_every < 0:
        errors.append(f"eval_every must be an int >= 0 (stages between evaluations; 0: off), got "
                      f"{config.eval_every!r}.")
    sources = prompt_sources(config)
    if len(sources) > 1:
        errors.append(f"give the evaluation prompts one way, not {len(sources)}: {', '.join(sources)}.")
    if on and not sources:
        errors.append(f"eval_every={config.eval_every} needs evaluation prompts: set eval_prompts, "
                      "eval_prompts_file or eval_prompts_dataset.")
    if config.eval_prompts and not all(isinstance(p, str) and p.strip() for p in config.eval_prompts):
        errors.append(f"eval_prompts must be non-empty strings, got {list(config.eval_prompts)!r}.")
    seeds = config.eval_seeds
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        errors.append(f"eval_seeds must be a non-empty list of ints (noise seeds), got {seeds!r}.")
    elif len(set(seeds)) != len(seeds):
        errors.append(f"eval_seeds has repeated seeds {list(seeds)}: each seed would score the same images twice.")
    names = config.eval_rewards
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        errors.append(f"eval_rewards must be a list of reward names, got {names!r}.")
    else:
        keys = [metric_key(n) for n in eval_reward_names(config)]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            errors.append(f"eval_rewards logs {repeated} more than once; name each reward once.")
        elif config.metric_for_best_model is not None and best_metric_name(config) not in keys:
            errors.append(f"metric_for_best_model={config.metric_for_best_model!r} is not an evaluation metric; use "
                          f"one of {keys} (or add its reward to eval_rewards).")
    if config.save_best and not on:
        errors.append("save_best=True keeps the best evaluated checkpoint: set eval_every > 0 (and evaluation "
                      "prompts).")
    if config.load_best_model_at_end and not config.save_best:
        errors.append("load_best_model_at_end=True restores the best checkpoint: set save_best=True too.")
    if config.on_collapse not in ON_COLLAPSE:
        errors.append(f"on_collapse must be one of {ON_COLLAPSE}, got {config.on_collapse!r}.")
    elif config.on_collapse == "rollback":
        if not config.save_best:
            errors.append("on_collapse='rollback' restores the best checkpoint: set save_best=True (with "
                          "eval_every > 0 and evaluation prompts).")
        if config.num_branches < 2:
            errors.append("on_collapse='rollback' goes on with selection_rule='pairs', which needs num_branches >= 2.")
    if config.collapse_tolerance is not None:
        if not (isinstance(config.collapse_tolerance, (int, float)) and config.collapse_tolerance >= 0):
            errors.append(f"collapse_tolerance must be >= 0 (or None: evaluations do not trigger the guard), got "
                          f"{config.collapse_tolerance!r}.")
        if not on:
            errors.append("collapse_tolerance compares evaluations: set eval_every > 0 (and evaluation prompts).")
    return errors


@dataclass
class EvaluationFields:
    """The evaluation, best-checkpoint and collapse-guard fields of [`B2DiffuRLConfig`] (documented there)."""

    # evaluation during training, the best checkpoint and the collapse guard (docs/evaluation.md)
    eval_prompts: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Evaluation prompts, given inline (or use eval_prompts_file / eval_prompts_dataset)."},
    )
    eval_prompts_file: Optional[str] = field(
        default=None, metadata={"help": "A text file of evaluation prompts, one per line."}
    )
    eval_prompts_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "A `datasets` dataset of evaluation prompts: a Hub id, a local dataset or a save_to_disk "
                  "folder."},
    )
    eval_prompts_dataset_split: str = field(default="train", metadata={"help": "Split of eval_prompts_dataset."})
    eval_prompts_dataset_column: str = field(default="prompt", metadata={"help": "Column of eval_prompts_dataset."})
    eval_every: int = field(
        default=0,
        metadata={"help": "Evaluate every this many stages, and after the last one (0: no evaluation during "
                  "training)."},
    )
    eval_seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Noise seeds of the evaluation: one image per prompt and seed, the same noise at every "
                  "evaluation."},
    )
    eval_rewards: list[str] = field(
        default_factory=list,
        metadata={"help": "Rewards the evaluation scores with, logged as eval/<name>: names for "
                  "b2trl.rewards.get_reward or 'package.module:function'; 'reward' is the training reward. "
                  "Default: the training reward alone (eval/reward)."},
    )
    save_best: bool = field(
        default=False,
        metadata={"help": "Keep the checkpoint with the best metric_for_best_model as checkpoints/checkpoint_best "
                  "(needs eval_every > 0)."},
    )
    metric_for_best_model: Optional[str] = field(
        default=None,
        metadata={"help": "The evaluation metric that decides the best checkpoint and the evaluation-drop guard, "
                  "e.g. 'eval/clip_score' (the 'eval/' may be left out). Default: the first of eval_rewards."},
    )
    greater_is_better: bool = field(
        default=True, metadata={"help": "Whether a higher metric_for_best_model is better (rewards: yes)."}
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={"help": "At the end of train(), restore the best checkpoint (needs save_best). A run the guard "
                  "stops (on_collapse='stop') restores it anyway."},
    )
    on_collapse: str = field(
        default="warn",
        metadata={
            "help": "When the skew watch fires or an evaluation falls more than collapse_tolerance below the best: "
            "'warn' (log it and go on), 'stop' (end training) or 'rollback' (restore the best checkpoint and go "
            "on with selection_rule='pairs'; needs save_best).",
            "choices": ["warn", "stop", "rollback"],
        },
    )
    collapse_tolerance: Optional[float] = field(
        default=None,
        metadata={"help": "An evaluation more than this far below the best (in the metric's units) counts as a "
                  "collapse. None: evaluations do not trigger the guard, only the skew watch does."},
    )
