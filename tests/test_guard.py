"""The collapse guard: warn, stop and rollback, fired by a scripted evaluation drop and by the skew watch."""

import logging
import math

import pytest

from b2trl import B2DiffuRLConfig
from b2trl.guard import CollapseGuard
from eval_helpers import scripted_eval_reward, skewed_reward
from helpers import lora_params, make_trainer, max_change


def _trainer(model_dir, tmp_path, **overrides):
    # the paper's rule: the one whose skewed stages the guard watches and whose rollback switches it to "pairs"
    values = dict(selection_rule="best_worst", eval_prompts=["a cat", "a dog"], eval_seeds=[0], eval_every=1,
                  train_learning_rate=1e-2,
                  project_kwargs={"project_dir": str(tmp_path)})
    values.update(overrides)
    trainer = make_trainer(model_dir, **values)
    trainer.weights = {}  # the weights after each stage, as its statistics are written
    trainer.rows = []
    trainer.stage_end_callbacks.append(lambda t, stats: (t.weights.update({stats["stage"]: lora_params(t.sd_pipeline)}),
                                                         t.rows.append(dict(stats))))
    return trainer


def _skewed(model_dir, tmp_path, **overrides):
    """Six branches and a reward that fails one branch per group: the skew watch fires after stage 2."""
    return _trainer(model_dir, tmp_path, reward=skewed_reward(6), num_branches=6, sample_batch_size=1, **overrides)


# ------------------------------------------------------------------ the bookkeeping


def test_the_guard_tracks_the_best_in_the_metrics_direction_and_measures_drops():
    guard = CollapseGuard("warn", "eval/r", greater_is_better=True, tolerance=0.1)
    assert guard.drop(0.5) is None  # nothing to fall from yet
    assert guard.improves(0.5) and not guard.improves(float("nan")) and not guard.improves(None)
    guard.set_best(0, 0.5)
    assert not guard.improves(0.5) and guard.improves(0.51)
    assert guard.drop(0.45) is None and guard.drop(0.4) is None  # 0.1 below: within the tolerance
    assert guard.drop(0.3) == pytest.approx(0.2) and guard.drop(float("nan")) == math.inf
    lower = CollapseGuard("stop", "eval/loss", greater_is_better=False, tolerance=0.0)
    lower.set_best(3, 1.0)
    assert lower.improves(0.9) and not lower.improves(1.1)
    assert lower.drop(1.25) == pytest.approx(0.25) and lower.drop(0.9) is None
    assert CollapseGuard("warn", "eval/r").drop(-100.0) is None  # no tolerance: evaluations never fire it


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(on_collapse="abort"), "on_collapse must be one of"),
        (dict(on_collapse="rollback"), "on_collapse='rollback' restores the best checkpoint: set save_best=True"),
        (dict(collapse_tolerance=0.1), "collapse_tolerance compares evaluations: set eval_every > 0"),
        (dict(eval_prompts=["a"], eval_every=1, collapse_tolerance=-1.0), "collapse_tolerance must be >= 0"),
        (dict(eval_prompts=["a"], eval_every=1, save_best=True, on_collapse="rollback", num_branches=1,
              selection_rule="all"), "needs num_branches >= 2"),
    ],
)
def test_guard_settings_are_checked_with_the_field_and_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        B2DiffuRLConfig(**fields)


# ------------------------------------------------------------------ a scripted evaluation drop


def test_warn_logs_an_evaluation_drop_and_goes_on(tiny_model_dir, tmp_path, caplog):
    scripted_eval_reward([0.75, 0.25, 0.5])
    trainer = _trainer(tiny_model_dir, tmp_path, num_epochs=3, eval_rewards=["scripted"], collapse_tolerance=0.25)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert [row.get("guard/eval_drop", 0) for row in trainer.rows] == [0, 1, 0]  # 0.5 lies within the tolerance
    assert [e.action for e in trainer.guard.events] == ["warn"] and trainer.guard.stopped is None
    assert "eval/scripted = 0.2500, 0.5000 below the best (0.7500 after stage 0)" in caplog.text
    assert trainer.last_stage_stats["stage"] == 2


def test_stop_ends_training_after_the_drop_and_restores_the_best(tiny_model_dir, tmp_path, caplog):
    scripted_eval_reward([0.5, 0.875, 0.25, 0.875])
    # no load_best_model_at_end: a stopped run restores the best checkpoint anyway
    trainer = _trainer(tiny_model_dir, tmp_path, num_epochs=4, eval_rewards=["scripted"], collapse_tolerance=0.5,
                       on_collapse="stop", save_best=True)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    event = trainer.guard.stopped
    assert (event.stage, event.trigger, event.action) == (2, "eval_drop", "stop")
    assert [row["stage"] for row in trainer.rows] == [0, 1, 2]  # stage 3 never ran
    assert trainer.rows[-1]["guard/stop"] == 1 and trainer.first_epoch == 3
    assert "Stopping after stage 2" in caplog.text and trainer.best_checkpoint_dir in caplog.text
    assert "Its weights are restored" in caplog.text
    assert max_change(trainer.weights[1], lora_params(trainer.sd_pipeline)) == 0  # the best weights are back


def test_rollback_on_an_evaluation_drop_restores_the_best_and_trains_on_with_pairs(tiny_model_dir, tmp_path):
    scripted_eval_reward([0.5, 0.75, 0.125, 0.75])
    trainer = _trainer(tiny_model_dir, tmp_path, num_epochs=4, eval_rewards=["scripted"], collapse_tolerance=0.5,
                       on_collapse="rollback", save_best=True)
    history_at_best = None

    def remember_history(t, stats):
        nonlocal history_at_best
        if stats["stage"] == 1:
            history_at_best = t.rule.state_dict()

    trainer.stage_end_callbacks.insert(0, remember_history)
    trainer.train()
    rolled = trainer.rows[2]
    assert rolled["guard/eval_drop"] == 1 and rolled["guard/rollback"] == 1 and rolled["guard/restored_stage"] == 1
    assert max_change(trainer.weights[1], trainer.weights[2]) == 0  # after stage 2: stage 1's weights again
    assert max_change(trainer.weights[2], trainer.weights[3]) > 0  # and training went on from them
    assert trainer.rule.name == "pairs" and trainer.guard.rollbacks == 1
    # the per-prompt history carried over is the best checkpoint's (then stage 3's rewards joined it)
    restored = trainer.rule.history.state_dict()["stages"]
    assert {p: w[:-1] for p, w in restored.items()} == {p: w for p, w in history_at_best["history"]["stages"].items()}
    assert [row["stage"] for row in trainer.rows] == [0, 1, 2, 3]  # the stage count goes on


# ------------------------------------------------------------------ the skew watch


def test_warn_is_todays_warning_when_the_skew_watch_fires(tiny_model_dir, tmp_path, caplog):
    trainer = _skewed(tiny_model_dir, tmp_path, num_epochs=4, eval_every=0, eval_prompts=None)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert [row.get("guard/skew", 0) for row in trainer.rows] == [0, 0, 1, 0]
    assert [row["samples_kept_positive"] for row in trainer.rows[:3]] == [0, 0, 0]
    assert caplog.text.count("the kept samples' advantages were mostly negative") == 1  # today's warning, once
    assert trainer.rule.name == "best_worst" and trainer.last_stage_stats["stage"] == 3


def test_stop_when_the_skew_watch_fires(tiny_model_dir, tmp_path):
    trainer = _skewed(tiny_model_dir, tmp_path, num_epochs=5, eval_every=0, eval_prompts=None, on_collapse="stop")
    trainer.train()
    assert trainer.guard.stopped.trigger == "skew" and trainer.guard.stopped.stage == 2
    assert "no best checkpoint yet" in trainer.guard.stopped.message
    assert len(trainer.rows) == 3
    assert max_change(trainer.weights[2], lora_params(trainer.sd_pipeline)) == 0  # nothing to restore: the last


def test_rollback_when_the_skew_watch_fires_and_a_resumed_run_keeps_the_pairs_rule(tiny_model_dir, tmp_path):
    scripted_eval_reward([0.25, 0.75, 0.5])
    trainer = _skewed(tiny_model_dir, tmp_path, num_epochs=4, eval_rewards=["scripted"], on_collapse="rollback",
                      save_best=True, save_freq=1)
    trainer.train()
    rolled = trainer.rows[2]
    assert rolled["guard/skew"] == 1 and rolled["guard/restored_stage"] == 1
    assert max_change(trainer.weights[1], trainer.weights[2]) == 0
    assert trainer.rule.name == "pairs"
    assert trainer.rows[3]["samples_kept_positive"] == trainer.rows[3]["samples_kept_negative"]  # zero-sum pairs
    resumed = _skewed(tiny_model_dir, tmp_path, num_epochs=5, eval_rewards=["scripted"], on_collapse="rollback",
                      save_best=True, save_freq=1, resume_from="latest")
    assert resumed.rule.name == "pairs" and resumed.guard.rollbacks == 1 and resumed.guard.best_stage == 1


def test_rollback_before_any_evaluation_switches_the_rule_in_place(tiny_model_dir, tmp_path):
    trainer = _skewed(tiny_model_dir, tmp_path, num_epochs=4, eval_every=10, on_collapse="rollback", save_best=True,
                      eval_rewards=["helpers:brightness_reward"])
    trainer.train()
    rolled = trainer.rows[2]
    assert rolled["guard/rollback"] == 1 and rolled["guard/restored_stage"] == -1
    assert max_change(trainer.weights[2], trainer.weights[3]) > 0
    assert trainer.rule.name == "pairs" and "no best checkpoint yet" in trainer.guard.events[0].message
    assert "eval/brightness_reward" in trainer.rows[3]  # the last stage is evaluated
