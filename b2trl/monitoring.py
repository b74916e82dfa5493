"""Evaluation during training, the best checkpoint and the collapse guard, as the trainer runs them.

[`TrainingMonitor`] is the part of [`B2DiffuRLTrainer`] that runs after a stage's update: it evaluates when one is
due ([`~b2trl.evaluation.Evaluator`]), keeps the best checkpoint (``checkpoints/checkpoint_best``), and acts when
the collapse guard fires ([`~b2trl.guard.CollapseGuard`]): a warning, a stop, or a rollback to the best checkpoint
that goes on with the zero-sum ``"pairs"`` rule. Every process takes part in each step, and every decision is made
from numbers that are the same on every process (gathered rewards, broadcast evaluation metrics).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Optional

import numpy as np
import torch
from accelerate import logging

from . import checkpoint as ckpt
from .advantages import build_rule
from .checkpoint import BEST_NAME
from .evaluation import EvalResult, Evaluator, evaluation_prompts
from .evaluation_config import best_metric_name, evaluates, prompt_sources
from .guard import CollapseEvent, CollapseGuard
from .stage import Stage
from .trackers import log_image

logger = logging.get_logger(__name__)

ROLLBACK_RULE = "pairs"


@contextlib.contextmanager
def kept_random_state():
    """Restoring a checkpoint mid-run must not rewind the random streams to the checkpoint's (the stages after a
    rollback would replay the noise of the stages after the best one): they are put back as they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class TrainingMonitor:
    """The evaluation, best-checkpoint and collapse-guard part of [`B2DiffuRLTrainer`] (a mixin: it uses the
    trainer's config, accelerator, rule, skew watch and checkpoint helpers)."""

    def setup_monitoring(self) -> None:
        """Build the evaluator (reading the prompts now, so that a bad source fails before any training) and the
        guard; refuse a fresh run whose project folder already holds another run's best checkpoint."""
        config = self.config
        self.evaluator: Optional[Evaluator] = None
        if prompt_sources(config):
            self.evaluator = Evaluator(config, self.reward_fn, evaluation_prompts(config))
        self.guard = CollapseGuard(config.on_collapse, best_metric_name(config), config.greater_is_better,
                                   config.collapse_tolerance)
        self.last_evaluation: Optional[EvalResult] = None
        self.final_stage = config.num_epochs - 1
        self._skew_warning: Optional[str] = None
        if config.save_best and not config.resume_from and ckpt.is_complete(self.best_checkpoint_dir):
            raise ValueError(
                f"{self.best_checkpoint_dir} is the best checkpoint of another run. Continue that run with "
                "resume_from='latest', or use another project_dir (project_kwargs / output folder)."
            )
        if not config.resume_from:
            self._trim_evaluation_log(None)  # a fresh run's record starts empty

    @property
    def evaluation_dir(self) -> str:
        """Where each evaluation's grid and scores are written: ``<project_dir>/evaluation``."""
        return os.path.join(self.accelerator.project_dir, "evaluation")

    def _trim_evaluation_log(self, last_stage: Optional[int]) -> None:
        """Keep the records of ``evaluations.jsonl`` up to `last_stage` (none with `None`): a resumed run evaluates
        the later stages again, and each stage is recorded once."""
        path = os.path.join(self.evaluation_dir, "evaluations.jsonl")
        if not self.accelerator.is_main_process or not os.path.isfile(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [] if last_stage is None else [line for line in lines if json.loads(line)["stage"] <= last_stage]
        with open(path, "w") as f:
            f.writelines(kept)

    @property
    def best_checkpoint_dir(self) -> str:
        """Where `save_best` keeps the best checkpoint: ``<project_dir>/checkpoints/checkpoint_best``."""
        return os.path.join(self.checkpoint_dir, BEST_NAME)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> EvalResult:
        """
        Sample every evaluation prompt once per seed of `eval_seeds` with the current weights (the EMA weights when
        `ema_decay > 0`) and score them with each evaluation reward. Every process must call it. Nothing is logged
        or saved; during training the trainer does that itself every `eval_every` stages.
        """
        if self.evaluator is None:
            raise ValueError("evaluate() needs evaluation prompts: set eval_prompts, eval_prompts_file or "
                             "eval_prompts_dataset in the config.")
        result = self.evaluator.evaluate(self)
        self.last_evaluation = result
        return result

    def evaluation_due(self, stage_index: int) -> bool:
        """Whether training evaluates after stage `stage_index`: every `eval_every` stages and after the last."""
        every = self.config.eval_every
        return evaluates(self.config) and ((stage_index + 1) % every == 0 or stage_index == self.final_stage)

    def _publish(self, stage_index: int, result: EvalResult, best: bool) -> None:
        """The grid to the trackers; the grid and the scores under ``<project_dir>/evaluation/`` (main process)."""
        if not self.accelerator.is_main_process:
            return
        log_image(self.accelerator.trackers, "eval/grid", result.grid, stage_index)
        folder = self.evaluation_dir
        os.makedirs(folder, exist_ok=True)
        result.grid.save(os.path.join(folder, f"stage_{stage_index:04d}.png"))
        record = {"stage": stage_index, **result.metrics, "best": best, "seeds": result.seeds,
                  "per_prompt": {key: dict(zip(result.prompts, np.nanmean(v, axis=1).tolist()))
                                 for key, v in result.scores.items()}}
        with open(os.path.join(folder, "evaluations.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ after each stage

    def notice_skew(self, stage: Stage, warning: str) -> None:
        """The skew watch fired at `stage`: warn now (as always); the guard acts at the end of the stage."""
        logger.warning(warning)
        self._skew_warning = warning

    def monitor_stage(self, stage: Stage, global_step: int) -> Stage:
        """
        After the stage's update: evaluate if due (logging ``eval/<reward>``), keep the best checkpoint, and let
        the guard act on what fired. Returns the stage with these statistics (``eval/*``, ``time/evaluation``,
        ``guard/*``).
        """
        stats, triggers = {}, []
        if self._skew_warning is not None:
            triggers.append(("skew", "the kept samples' advantages were mostly negative (the skew watch)"))
            self._skew_warning = None
        if self.evaluator is not None and self.evaluation_due(stage.index):
            result = self.evaluate()
            stats.update(result.metrics)
            stats["time/evaluation"] = result.seconds
            value = result.metrics.get(self.guard.metric)
            fall = self.guard.drop(value)
            if fall is not None:
                triggers.append(("eval_drop", self.guard.drop_message(value, fall)))
            best = self.guard.improves(value)
            if best:
                self.guard.set_best(stage.index, value)
                if self.config.save_best:
                    self._save_best(stage.index, global_step, result.metrics)
            self._publish(stage.index, result, best)
        if triggers:
            stats.update(self._collapse(stage.index, triggers))
        return stage.with_stats(**stats)

    def _save_best(self, stage_index: int, global_step: int, metrics: dict) -> None:
        state = self.checkpoint_state(stage_index, global_step)
        state["best"] = {"metric": self.guard.metric, "value": self.guard.best_value, "stage": stage_index,
                         "metrics": metrics}
        ckpt.save_stage(self.accelerator, self.checkpoint_dir, stage_index, state, name=BEST_NAME)

    def _best_description(self) -> str:
        if self.guard.best_stage is None:
            return "no best checkpoint yet (no evaluation before this)"
        where = self.best_checkpoint_dir if self.config.save_best else "not saved (save_best=False)"
        return f"{where} ({self.guard.metric} = {self.guard.best_value:.4f} after stage {self.guard.best_stage})"

    def _collapse(self, stage_index: int, triggers: list[tuple[str, str]]) -> dict:
        """Act on the guard's triggers after stage `stage_index` as `on_collapse` says; returns the ``guard/*``
        statistics of the event."""
        trigger = "+".join(name for name, _ in triggers)
        what = "; ".join(text for _, text in triggers)
        stats = {f"guard/{name}": 1 for name, _ in triggers}
        mode = self.config.on_collapse
        restored = None
        if mode == "warn":
            message = f"Stage {stage_index}: collapse guard: {what}. on_collapse='warn': training goes on."
        elif mode == "stop":
            message = (f"Stopping after stage {stage_index}: {what} (on_collapse='stop'). Best checkpoint: "
                       f"{self._best_description()}.")
            if self._restores_best(stopping=True):
                message += " Its weights are restored."
            stats["guard/stop"] = 1
        else:
            best = self._best_description()
            restored = self.rollback()
            message = (f"Stage {stage_index}: {what}. on_collapse='rollback': "
                       + (f"restored the best checkpoint, {best}," if restored is not None
                          else f"{best} to restore; the weights stay,")
                       + f" and training goes on with selection_rule={ROLLBACK_RULE!r}.")
            stats["guard/rollback"] = 1
            stats["guard/restored_stage"] = -1 if restored is None else restored
        if mode != "warn" or trigger != "skew":  # the skew watch's own warning already said it all
            logger.warning(message)
        self.guard.record(CollapseEvent(stage_index, trigger, mode, message, restored))
        return stats

    def rollback(self) -> Optional[int]:
        """
        Restore the best checkpoint (weights, optimizer, EMA and its per-prompt reward history; the random streams,
        the stage count, the global step and the compute counter go on) and switch to the ``"pairs"`` rule, whose
        zero-sum advantages cannot push likelihoods down on balance. Without a best checkpoint only the rule
        changes, with the current history. Returns the restored stage, or `None`. Every process must call it.
        """
        rule = build_rule(self.config, ROLLBACK_RULE)
        history = self.rule.state_dict()
        restored = None
        if self.guard.best_stage is not None and ckpt.is_complete(self.best_checkpoint_dir):
            with kept_random_state():
                self.accelerator.load_state(self.best_checkpoint_dir)
            state = ckpt.read_state(self.best_checkpoint_dir)
            history, restored = state.get("advantage_rule", {}), int(state["stage"])
        if "history" in history:  # the z-score rules share one history format; GRPO keeps none
            rule.load_state_dict(history)
        self.rule = rule
        self.skew_watch = type(self.skew_watch)(self.skew_watch.stages, self.skew_watch.ratio)
        return restored

    def _restores_best(self, stopping: bool) -> bool:
        """Whether the end of `train()` restores the best checkpoint: with `load_best_model_at_end`, and always when
        the guard stopped the run (its last weights are the ones it stopped for) and a best checkpoint was kept."""
        best = self.best_checkpoint_dir
        kept = self.config.save_best and self.guard.best_stage is not None and ckpt.is_complete(best)
        return kept and (self.config.load_best_model_at_end or stopping)

    def end_monitoring(self) -> None:
        """At the end of `train()`: restore the best checkpoint with `load_best_model_at_end`, or when the guard
        stopped the run and `save_best` kept one."""
        if self._restores_best(stopping=self.guard.stopped is not None):
            self.load_best()

    def load_best(self) -> str:
        """Restore the best checkpoint's weights, optimizer and EMA (every process must call it); returns its path."""
        path = self.best_checkpoint_dir
        if not ckpt.is_complete(path):
            raise ValueError(f"no complete best checkpoint at {path}: save_best=True keeps one once training has "
                             "evaluated.")
        with kept_random_state():
            self.accelerator.load_state(path)
        logger.info(f"Restored the best checkpoint: {self._best_description()}.")
        return path

    # ------------------------------------------------------------------ checkpoints

    def monitoring_state(self) -> dict:
        """What a checkpoint holds of the guard: the best evaluation, its events, and the rule that runs (which a
        rollback changes)."""
        return {"guard": self.guard.state_dict(), "selection_rule": self.rule.name}

    def load_monitoring_state(self, state: dict) -> None:
        """Restore [`monitoring_state`] from a checkpoint's state: the guard and, after a rollback, the rule."""
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        self._trim_evaluation_log(int(state["stage"]))
        name = state.get("selection_rule")
        if name and name != self.rule.name:
            self.rule = build_rule(self.config, name)
