"""What a toy run reports: held-out alignment of the base and the trained model, scored on the same noise.

``examples/train_sd.py`` calls [`evaluate_base`] before training and [`report_heldout`] after it; the report
holds the numbers, writes the before/after grid and ``evaluation.json``, and gives the model card its sample
images and evaluation table.

    from b2trl.toy.report import evaluate_base, report_heldout

    base = evaluate_base(pipeline, seeds=[0, 1, 2])      # before training
    ...                                                  # train, then trainer.save_pretrained("run/lora")
    report = report_heldout(base, "run/lora", use_lora=True, output_dir="run")
    print(report.headline())
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .evaluate import evaluate_alignment, save_grid
from .world import heldout_prompts


def evaluate_base(pipeline, seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """
    Held-out alignment of the model before training, with its samples (see [`evaluate_alignment`]).

    Args:
        pipeline: the pipeline about to be trained (a diffusers pipeline or TRL's DDPO wrapper of one).
        seeds (`Sequence[int]`, *optional*, defaults to `(0, 1, 2)`): noise seeds per held-out prompt.
    """
    return evaluate_alignment(pipeline, seeds=list(seeds), return_images=True)


def evaluate_trained(
    saved: str, *, use_lora: bool, seeds: Sequence[int] = (0, 1, 2), base_model: str | None = None
) -> dict:
    """
    Held-out alignment of a saved fine-tune, loaded as a user would load it: the base toy model (`base_model`, a
    folder; by default the shipped SD toy model) plus the LoRA in `saved`, or the whole pipeline saved in `saved`.
    """
    if use_lora:
        return evaluate_alignment(base_model, lora_path=saved, seeds=list(seeds), return_images=True)
    return evaluate_alignment(saved, seeds=list(seeds), return_images=True)


@dataclass
class HeldOutReport:
    """
    Held-out alignment before and after training, on the same prompts and the same noise.

    Parameters:
        base (`dict`): [`evaluate_alignment`]'s result for the base model (without images).
        trained (`dict`): the same for the trained model.
        seeds (`list[int]`): the noise seeds, one sample per held-out prompt and seed.
        images (`dict[str, torch.Tensor]`): ``"base"`` and ``"trained"`` samples, ``(S, P, 3, H, W)``.
        grid (`str`, *optional*): the before/after grid's PNG, once written.
        evaluation_file (`str`, *optional*): ``evaluation.json``, once written.
    """

    base: dict
    trained: dict
    seeds: list
    images: dict
    grid: str | None = None
    evaluation_file: str | None = None

    @property
    def prompts(self) -> list[str]:
        return list(self.base["per_prompt"])

    def headline(self) -> str:
        """One line: overall alignment before and after, and per seed."""
        per_seed = [", ".join(f"{v:.3f}" for v in r["per_seed"]) for r in (self.base, self.trained)]
        return (
            f"Held-out alignment: base {self.base['overall']:.3f} -> trained {self.trained['overall']:.3f} "
            f"(per seed {per_seed[0]} -> {per_seed[1]})"
        )

    def summary(self) -> dict:
        """The fields a run's ``summary.json`` gets."""
        fields = dict(
            heldout_alignment_base=self.base["overall"],
            heldout_alignment_trained=self.trained["overall"],
            heldout_per_seed_base=self.base["per_seed"],
            heldout_per_seed_trained=self.trained["per_seed"],
            diversity_base=self.base["diversity"],
            diversity_trained=self.trained["diversity"],
        )
        if self.grid:
            fields["before_after_grid"] = self.grid
        return fields

    def card_evaluation(self) -> dict:
        """Rows of the model card's evaluation table: ``{label: {"base": value, "trained": value}}``."""
        n_prompts, n_seeds = len(self.prompts), len(self.seeds)
        overall = f"held-out alignment ({n_prompts} prompts × {n_seeds} seeds)"
        rows = {overall: (self.base["overall"], self.trained["overall"])}
        for template, value in self.base["per_template"].items():
            rows[f"held-out alignment, {template} prompts"] = (value, self.trained["per_template"][template])
        rows["diversity between seeds (RMS, 0-255)"] = (self.base["diversity"], self.trained["diversity"])
        return {label: {"base": b, "trained": t} for label, (b, t) in rows.items()}

    def curve_marks(self) -> dict:
        """What [`~b2trl.images.plot_reward_curve`] draws beside the training reward."""
        return {"label": "held-out alignment", "base": self.base["overall"], "trained": self.trained["overall"]}

    def card_samples(self, num_prompts: int = 2, num_seeds: int = 2) -> tuple[list[str], list[int], dict]:
        """
        A few of the evaluation's samples for the model card: the first held-out prompts of each template that
        has two objects (where the base model errs), under the first seeds, base and trained.

        Returns:
            `(prompts, seeds, {"base": images, "trained": images})`, images ``(seeds, prompts, 3, H, W)``.
        """
        prompts = self.prompts
        chosen = []
        for template in ("relation", "binding", "single"):
            chosen += [i for i, p in enumerate(prompts) if _template(p) == template][:1]
        chosen = (chosen + [i for i in range(len(prompts)) if i not in chosen])[:num_prompts]
        seeds = self.seeds[:num_seeds]
        picked = {name: images[: len(seeds)][:, chosen] for name, images in self.images.items()}
        return [prompts[i] for i in chosen], seeds, picked

    def write(self, output_dir: str, shown: int = 8) -> HeldOutReport:
        """
        Write the before/after grid of the first `shown` held-out prompts (``before_after_heldout.png``: one row per
        prompt, the base model's seeds then the trained model's, each column headed) and ``evaluation.json``.
        """
        shown = min(shown, len(self.prompts))
        base, trained = self.images["base"][:, :shown], self.images["trained"][:, :shown]
        columns = [f"{name} · seed {s}" for name in ("base", "trained") for s in self.seeds]
        self.grid = os.path.join(output_dir, "before_after_heldout.png")
        both = torch.cat([base, trained], dim=0)
        save_grid(both, self.grid, nrow=both.shape[0], labels=self.prompts[:shown], column_labels=columns)
        self.evaluation_file = os.path.join(output_dir, "evaluation.json")
        with open(self.evaluation_file, "w") as f:
            json.dump({"base": self.base, "trained": self.trained}, f, indent=2)
        return self


def _template(prompt: str) -> str:
    from .world import parse_prompt

    return parse_prompt(prompt).template


def report_heldout(
    base: dict,
    saved: str,
    *,
    use_lora: bool,
    output_dir: str,
    seeds: Sequence[int] | None = None,
    base_model: str | None = None,
) -> HeldOutReport:
    """
    Evaluate the saved fine-tune on the held-out prompts with the same seeds as `base`, write the before/after
    grid and ``evaluation.json`` to `output_dir`, and return the [`HeldOutReport`].

    Args:
        base (`dict`): [`evaluate_base`]'s result (with its images).
        saved (`str`): the folder `trainer.save_pretrained` wrote.
        use_lora (`bool`): whether `saved` holds a LoRA (else a whole pipeline).
        output_dir (`str`): where the grid and ``evaluation.json`` go.
        seeds (`Sequence[int]`, *optional*): the seeds `base` was sampled with; by default ``0 .. S-1``.
        base_model (`str`, *optional*): the base model's folder a LoRA applies to (default: the SD toy model).
    """
    base = dict(base)
    base_images = base.pop("images")
    seeds = list(seeds) if seeds is not None else list(range(base_images.shape[0]))
    if list(base["per_prompt"]) != heldout_prompts() or len(seeds) != base_images.shape[0]:
        raise ValueError("report_heldout: `base` must come from evaluate_base on the held-out prompts with `seeds`.")
    trained = evaluate_trained(saved, use_lora=use_lora, seeds=seeds, base_model=base_model)
    trained_images = trained.pop("images")
    report = HeldOutReport(base, trained, seeds, {"base": base_images, "trained": trained_images})
    return report.write(output_dir)
