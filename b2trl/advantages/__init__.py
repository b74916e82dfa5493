"""Selection and advantage rules: one module per rule, registered by name (`B2DiffuRLConfig.selection_rule`).

A new rule is a class in a new module here, decorated with [`register_rule`], imported below, plus its test.
"""

from . import all as _all  # noqa: F401  (each import registers its rule)
from . import best_worst as _best_worst  # noqa: F401
from . import grpo as _grpo  # noqa: F401
from . import pairs as _pairs  # noqa: F401
from .base import RULES, AdvantageRule, Advantages, StageRewards, build_rule, clip_advantages, register_rule
from .best_worst import select_best_worst
from .grpo import group_normalized
from .pairs import kept_pairs, pair_advantages, select_pairs


def rule_names() -> tuple[str, ...]:
    """The names `selection_rule` accepts."""
    return tuple(RULES)


__all__ = [
    "RULES",
    "AdvantageRule",
    "Advantages",
    "StageRewards",
    "build_rule",
    "clip_advantages",
    "group_normalized",
    "kept_pairs",
    "pair_advantages",
    "register_rule",
    "rule_names",
    "select_best_worst",
    "select_pairs",
]
