"""One training run as the commands make it: the trainer, metrics on disk, training, the saved weights with a model
card that shows what changed, the reward curve, an optional push, and ``summary.json``.

What the card shows comes from a *report*: [`CardSamples`] (a few prompts under fixed seeds, before and after,
scored by the training reward) for any model, or the toy world's held-out evaluation (`b2trl.toy.main`).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

# the model card's samples: a few prompts, each under the same seeds before and after training
CARD_PROMPTS, CARD_SEEDS = 2, [0, 1]


@dataclass
class CardContent:
    """
    What a report gives the model card and the run's summary after training.

    Parameters:
        prompts (`list[str]`): the card's sample prompts.
        seeds (`list[int]`): their seeds.
        images (`dict`): ``{"base": ..., "trained": ...}``, each ``(seeds, prompts, 3, H, W)`` in [0, 1].
        evaluation (`dict`): the card's evaluation table, ``{measure: {model: value}}``.
        summary (`dict`, *optional*): fields added to ``summary.json``.
        curve_marks (`dict`, *optional*): an evaluation drawn beside the reward curve.
    """

    prompts: list
    seeds: list
    images: dict
    evaluation: dict
    summary: dict = field(default_factory=dict)
    curve_marks: Optional[dict] = None


class Report(Protocol):
    """What a run's model card shows, measured around training (see [`CardSamples`])."""

    def before(self, pipeline, config, device) -> None:
        """Called on the main process before training, with the base pipeline."""

    def after(self, trainer, saved: str, output_dir: str) -> CardContent:
        """Called on the main process after training, with the folder the weights were saved to."""


class CardSamples:
    """
    The card's samples for any model: the first distinct training prompts under fixed seeds, sampled as the
    rollout samples before and after training, and the training reward's mean on each set.

    Args:
        prompts (`Sequence[str]`): the training prompts (the first `CARD_PROMPTS` distinct ones are sampled).
        reward_name (`str`): the reward's name, for the card's evaluation table.
        reward_fn (`Callable`): the training reward.
    """

    def __init__(self, prompts: Sequence[str], reward_name: str, reward_fn: Callable):
        self.prompts = list(dict.fromkeys(prompts))[:CARD_PROMPTS]
        self.reward_name, self.reward_fn = reward_name, reward_fn
        self.images: dict[str, Any] = {}
        self.device = None

    def before(self, pipeline, config, device) -> None:
        from ..hub import sample_for_card

        self.device = device
        self.images["base"] = sample_for_card(pipeline, self.prompts, CARD_SEEDS, config, device)

    def after(self, trainer, saved: str, output_dir: str) -> CardContent:
        from ..hub import reward_evaluation, sample_for_card

        # a sharded denoiser runs only with every process taking part: sample the exported pipeline instead
        trained, device = trainer.sd_pipeline, None
        if getattr(trainer, "sharding", None) is not None:
            from ..models import load_pipeline

            trained, device = load_pipeline(saved, use_lora=False), self.device
        with trainer.accelerator.autocast():
            self.images["trained"] = sample_for_card(trained, self.prompts, CARD_SEEDS, trainer.config, device)
        label = f"reward `{self.reward_name}`, mean of the {len(self.prompts) * len(CARD_SEEDS)} samples above"
        evaluation = reward_evaluation(self.reward_fn, self.images, self.prompts, label, self.device)
        return CardContent(self.prompts, CARD_SEEDS, self.images, evaluation)


def prompt_function(prompts: Sequence[str], seed: int):
    """A TRL prompt function drawing uniformly from `prompts` with its own seeded generator."""
    rng = random.Random(seed)
    prompts = list(prompts)
    return lambda: (rng.choice(prompts), {})


def run_training(
    state,
    config,
    pipeline,
    *,
    reward_name: str,
    reward_fn: Callable,
    prompts: Sequence[str],
    output_dir: str,
    report: Report,
    base_model: str,
    hub_model_id: Optional[str] = None,
    init_lora: Optional[str] = None,
    branch_images: bool = True,
    summary: Optional[dict] = None,
) -> Optional[dict]:
    """
    Train `pipeline` with `config` and write the run's outputs to `output_dir`: ``lora/`` (or ``pipeline/``) with
    its model card and samples, ``lora_ema/`` when an EMA is kept, ``metrics.jsonl``/``.csv``, branch grids, the
    reward curve and ``summary.json``. Every process calls it.

    Args:
        state (`accelerate.PartialState`): the process state, created before the pipeline was loaded.
        config ([`B2DiffuRLConfig`]): the run's configuration.
        pipeline: the pipeline to train ([`~b2trl.load_pipeline`]'s).
        reward_name (`str`), reward_fn (`Callable`): the reward, by name (for the card) and as TRL's function.
        prompts (`Sequence[str]`): the training prompts, drawn at random by each process.
        output_dir (`str`): where everything goes.
        report ([`Report`]): what the card shows: [`CardSamples`], or the toy world's held-out evaluation.
        base_model (`str`): the base model as the user named it (the card's usage snippet).
        hub_model_id (`str`, *optional*): the repository to push to when `config.push_to_hub`.
        init_lora (`str`, *optional*): LoRA weights to start from.
        branch_images (`bool`, *optional*, defaults to `True`): save each stage's branch grid.
        summary (`dict`, *optional*): fields to start ``summary.json`` with.

    Returns:
        `dict` or `None`: the summary on the main process, `None` on the others.
    """
    from ..hub import build_model_card, push_folder, save_samples
    from ..images import BranchGridHook, plot_reward_curve
    from ..metrics import MetricsWriter
    from ..trainer import B2DiffuRLTrainer

    if state.is_main_process:
        report.before(pipeline, config, state.device)
    hook = None
    if branch_images and state.is_main_process:  # every process would write the same file names
        hook = BranchGridHook(config.num_branches, output_dir=os.path.join(output_dir, "branches"))
    # each process draws its own prompts (one shared sequence would sample the same prompts on every process)
    trainer = B2DiffuRLTrainer(config, reward_fn, prompt_function(prompts, config.seed + state.process_index),
                               pipeline, hook)
    if init_lora:
        trainer.load_lora_weights(init_lora)
    metrics = None
    if state.is_main_process:
        metrics = MetricsWriter(output_dir, resume_stage=trainer.first_epoch if config.resume_from else None)
        trainer.stage_end_callbacks.append(metrics)
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start

    saved = os.path.join(output_dir, "lora" if trainer.use_lora else "pipeline")
    card_kwargs = dict(base_model=base_model, reward_name=reward_name, repo_id=hub_model_id)
    trainer.save_pretrained(saved, **card_kwargs)
    if trainer.ema is not None:
        trainer.save_pretrained(f"{saved}_ema", ema=True, **card_kwargs)
    # every process: flush the trackers and destroy the process group; the rest is single-process work
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if not state.is_main_process:
        return None
    summary = {**(summary or {}), "reward": reward_name, "train_seconds": round(train_seconds, 1), "saved": saved}
    content = report.after(trainer, saved, output_dir)
    summary.update(content.summary)
    # the card shows what the run did: samples saved beside the weights (pushed with them) and the evaluation
    samples = save_samples(saved, content.prompts, content.seeds, content.images)
    card = build_model_card(trainer, **card_kwargs, samples=samples, evaluation=content.evaluation)
    card.save(os.path.join(saved, "README.md"))
    curve = plot_reward_curve(metrics.rows, os.path.join(output_dir, "reward_curve.png"), heldout=content.curve_marks)
    if curve:
        summary["reward_curve"] = curve
    if config.push_to_hub:
        url = push_folder(saved, hub_model_id or os.path.basename(os.path.abspath(output_dir)))
        summary["hub_url"] = url
        print(f"Pushed to {url}")
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Done in {train_seconds:.0f} s of training. Outputs in {output_dir}")
    return summary
