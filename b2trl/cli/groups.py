"""Which `--help` section each flag belongs to.

Every field of `B2DiffuRLConfig`, `IntervalSchedule` and a command's own arguments becomes a flag; a flag lands in
the first section one of whose patterns (`fnmatch`, on the field name) matches it, so that fields added later
(``sample_*``, ``train_*``, ``eval_*``) find their section without an edit here.
"""

from __future__ import annotations

import fnmatch
import re

SECTIONS: dict[str, tuple[str, ...]] = {
    "configuration": ("config",),
    "model": ("pretrained_*", "base", "lora", "pipelines", "labels", "use_lora", "init_lora", "resolution"),
    "data": ("prompts", "prompts_*", "negative_prompt*"),
    "reward": ("reward", "reward_*", "async_reward_computation", "max_workers", "drop_nonfinite_rewards"),
    "method & schedule": (
        "method", "num_branches", "selection_*", "history_stages", "advantage_*", "independent_noise", "loss_type",
        "dpo_beta", "kl_coef", "ema_*", "interval_schedule", "initial_length", "num_stages", "milestones", "anchor",
        "shift_every", "window_*",
    ),
    "sampling": ("sample_*", "noise_level", "prefix_sde", "suffix_sde", "rollout_chunk_size", "seeds",
                 "num_inference_steps", "guidance_scale", "eta", "batch_size"),
    "training": ("num_epochs", "train_*", "seed", "gradient_checkpointing", "resume_from", "save_freq",
                 "num_checkpoint_limit"),
    "precision & devices": ("mixed_precision", "allow_tf32", "compile_unet*", "accelerator_kwargs", "device",
                            "fsdp", "fsdp_*"),
    "evaluation": ("eval_*", "heldout_*", "save_best", "*_best_*", "load_best_model_at_end", "greater_is_better",
                   "on_collapse", "collapse_*"),
    "logging & output": (
        "output_dir", "log_with", "tracker_*", "exp_name", "run_name", "logdir", "project_kwargs", "push_to_hub",
        "hub_*", "branch_images", "grid_*", "log_*",
    ),
}
OTHER = "other settings"
IGNORED = "TRL fields b2trl ignores (accepted so that a DDPOConfig set-up still parses)"
_REPLACED_SENTENCE = re.compile(r"Fields of `DDPOConfig` that this trainer replaces:(.*?)(?:\n\s*\n|$)", re.DOTALL)


def replaced_trl_fields() -> list[str]:
    """
    The `DDPOConfig` fields `B2DiffuRLConfig` accepts but does not use, read from its docstring (the sentence
    "Fields of `DDPOConfig` that this trainer replaces: ..."; ``name*`` patterns expanded), the one place the code
    states it.
    """
    import dataclasses

    from trl import DDPOConfig

    from ..config import B2DiffuRLConfig

    match = _REPLACED_SENTENCE.search(B2DiffuRLConfig.__doc__ or "")
    if match is None:
        raise ValueError(
            "B2DiffuRLConfig's docstring no longer says which DDPOConfig fields it replaces (the sentence "
            "'Fields of `DDPOConfig` that this trainer replaces: ...'); the command line and the configuration "
            "reference are built from it."
        )
    base_names = [f.name for f in dataclasses.fields(DDPOConfig)]
    all_names = [f.name for f in dataclasses.fields(B2DiffuRLConfig)]
    names = []
    for pattern in re.findall(r"`([\w*]+)`", match.group(1)):
        found = fnmatch.filter(base_names, pattern)
        if not found and not fnmatch.filter(all_names, pattern):
            raise ValueError(f"B2DiffuRLConfig's docstring names `{pattern}`, which matches no config field.")
        # b2trl's own fields named there explain the replacement; only DDPOConfig's are replaced
        names += [n for n in found if n not in names]
    return names


def section_of(name: str, ignored: frozenset = frozenset()) -> str:
    """The `--help` section of the field `name`; `ignored` are the TRL fields b2trl does not use."""
    if name in ignored:
        return IGNORED
    for section, patterns in SECTIONS.items():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return section
    return OTHER


def rank_in_section(name: str) -> int:
    """The position of the first pattern that matches `name` within its section (fields of one pattern keep their
    dataclass order)."""
    for patterns in SECTIONS.values():
        for rank, pattern in enumerate(patterns):
            if fnmatch.fnmatchcase(name, pattern):
                return rank
    return len(SECTIONS)
