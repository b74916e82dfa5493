"""The field's methods as named presets of one trainer: each is a row of settings, not a code path.

Every method here is a point of the same space — which steps are stochastic and trained (the interval or
window), where trajectories fork (a shared prefix, or independent noise), how rewards become advantages (the rule)
and the loss. [`B2DiffuRLConfig.for_method`] builds a configuration from a row; `--method NAME` does the same on the
command line. docs/methods.md has the table with each row's source and what b2trl does differently.

A schedule value may be an expression in ``T`` (the number of sampling steps), resolved when the configuration is
built, so that "every step" follows the final `sample_num_steps`.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Any

FLOW = ("flow_sde",)  # methods defined on flow-matching models: the SDE step in the window, the ODE elsewhere


@dataclass(frozen=True)
class Method:
    """
    One named method.

    Attributes:
        name: the preset's name (``--method``).
        description: one line: what it does.
        source: the paper and repository it reproduces.
        settings: `B2DiffuRLConfig` fields.
        schedule: `IntervalSchedule` fields; values may be expressions in ``T``.
        samplers: the samplers it is defined for (empty: any); a pipeline whose family samples otherwise is
            refused with a clear error.
    """

    name: str
    description: str
    source: str
    settings: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    samplers: tuple[str, ...] = ()


GRPO = {"selection_rule": "grpo", "train_adv_clip_max": 5.0}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        "b2", "B²-DiffuRL: branch rollout over a backward-growing interval, best/worst selection, PPO-clip",
        "Hu et al., CVPR 2025, arXiv 2503.11240; github.com/hu-zijing/B2-DiffuRL",
        settings={"selection_rule": "best_worst"},
    ),
    Method(
        "b2_pairs", "B² with each group's best and worst branch together, zero-sum advantages ±gap/2 (the "
        "trainer's default rule)",
        "b2trl's studies (docs/study.md, docs/study_v3.md): the variant that did not collapse on the alignment reward",
        settings={"selection_rule": "pairs"},
    ),
    Method(
        "b2_grpo", "B²'s branch groups and interval with group-relative (GRPO) advantages",
        "B² (arXiv 2503.11240) + Flow-GRPO's advantages (arXiv 2505.05470)",
        settings={**GRPO, "advantage_std": "group"},
    ),
    Method(
        "ddpo", "DDPO: one trajectory per sample, every step trained, per-prompt statistics, PPO-clip 1e-4",
        "Black et al., ICLR 2024, arXiv 2305.13301; github.com/kvablack/ddpo-pytorch; TRL's DDPOTrainer",
        settings={"num_branches": 1, "selection_rule": "all", "train_clip_range": 1e-4},
        schedule={"initial_length": "T"},
    ),
    Method(
        "d3po", "D3PO: pairs from one initial noise, the whole trajectory, DPO loss against the base model",
        "Yang et al., CVPR 2024, arXiv 2311.13231; github.com/yk7333/d3po",
        settings={"num_branches": 2, "loss_type": "dpo", "selection_rule": "pairs", "selection_threshold_best": 0.0,
                  "selection_threshold_worst": 0.0},
        schedule={"initial_length": "T"},
    ),
    Method(
        "flow_grpo", "Flow-GRPO: each prompt's group from independent noise, SDE on every step, GRPO advantages "
        "with global std, KL 0.04, clip 1e-4, EMA",
        "Liu et al., arXiv 2505.05470; github.com/yifan123/flow_grpo (config/grpo.py, geneval_sd3)",
        settings={**GRPO, "advantage_std": "global", "independent_noise": True, "kl_coef": 0.04,
                  "train_clip_range": 1e-4, "train_num_inner_epochs": 1, "ema_decay": 0.9, "ema_update_every": 8},
        schedule={"anchor": "start", "initial_length": "T"},
        samplers=FLOW,
    ),
    Method(
        "flow_grpo_fast", "Flow-GRPO-Fast: an ODE trajectory branching into the group at a random 2-step SDE "
        "window in the first half, ODE after it, clip 1e-5, no KL",
        "github.com/yifan123/flow_grpo (README; config/grpo.py, pickscore_sd3_fast)",
        settings={**GRPO, "advantage_std": "global", "noise_level": 0.8, "kl_coef": 0.0, "train_clip_range": 1e-5,
                  "train_num_inner_epochs": 1, "ema_decay": 0.9, "ema_update_every": 8},
        schedule={"anchor": "random", "initial_length": 2, "window_max_start": "T // 2 - 2"},
        samplers=FLOW,
    ),
    Method(
        "mix_grpo", "MixGRPO: a 4-step SDE window sliding one step later every 25 stages from the first step, "
        "ODE outside it, GRPO advantages",
        "Li et al., arXiv 2507.21802; github.com/Tencent-Hunyuan/MixGRPO",
        settings={**GRPO, "advantage_std": "group", "train_clip_range": 1e-4},
        schedule={"anchor": "sliding", "initial_length": 4, "shift_every": 25},
        samplers=FLOW,
    ),
)}


def list_methods() -> dict[str, str]:
    """Name → one line: what the method does, and its source."""
    return {m.name: f"{m.description} ({m.source})" for m in METHODS.values()}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; b2trl's methods are {', '.join(METHODS)} (b2trl.list_methods()).")
    return METHODS[name]


# the schedule fields that count steps, and so may be given as expressions in T
STEP_FIELDS = ("initial_length", "window_max_start")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def resolve(value: Any, num_steps: int) -> Any:
    """A schedule value with ``T`` replaced by `num_steps` (``"T"``, ``"T // 2 - 2"``; only + - * //)."""
    if not isinstance(value, str):
        return value

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Name) and node.id == "T":
            return num_steps
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise ValueError(f"schedule value {value!r} is not an expression in T (+, -, *, // and integers).")

    return evaluate(ast.parse(value, mode="eval"))


def method_config(config_class, name: str, overrides: dict):
    """`config_class` (a `B2DiffuRLConfig`) for the method `name`, with `overrides` on top."""
    from .schedule import IntervalSchedule

    method = get_method(name)
    overrides = dict(overrides)
    given_schedule = overrides.pop("interval_schedule", None)
    settings = {**method.settings, **overrides}
    num_steps = settings.get("sample_num_steps", config_class.__dataclass_fields__["sample_num_steps"].default)
    if isinstance(given_schedule, IntervalSchedule):
        schedule = given_schedule
    else:
        fields = {**method.schedule, **(given_schedule or {})}
        schedule = IntervalSchedule(
            **{key: resolve(value, num_steps) if key in STEP_FIELDS else value for key, value in fields.items()}
        )
    return config_class(**settings, interval_schedule=schedule, method=name)


def check_sampler(method_name, sampler) -> None:
    """Refuse a method defined for other samplers (e.g. Flow-GRPO on a DDIM model), naming what fits."""
    if method_name is None:
        return
    method = get_method(method_name)
    if method.samplers and sampler.name not in method.samplers:
        raise ValueError(
            f"method={method_name!r} is defined for flow-matching models (SD3/SD3.5, FLUX.1, Qwen-Image, Z-Image): it "
            f"mixes the SDE and the ODE, and this model samples with {sampler.describe()}. Use 'b2', 'b2_pairs', "
            "'b2_grpo', 'ddpo' or 'd3po' here."
        )
