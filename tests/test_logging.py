from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import make_trainer


def test_stage_metrics_reach_tensorboard(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir,
        log_with="tensorboard",
        tracker_project_name="tb",
        project_kwargs={"project_dir": str(tmp_path), "logging_dir": str(tmp_path / "tb")},
    )
    trainer.train(epochs=2)
    trainer.accelerator.end_training()
    runs = [p for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert runs, "no tensorboard event file written"
    scalars = set()
    for run in {p.parent for p in runs}:
        events = EventAccumulator(str(run))
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
    for key in ("reward_mean", "reward_std", "interval_length", "branch_point", "groups_kept", "groups_total",
                "approx_kl", "clipfrac", "loss"):
        assert key in scalars, (key, sorted(scalars))
