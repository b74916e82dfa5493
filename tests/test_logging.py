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


def test_branch_grid_hook_logs_groups_with_rewards(tiny_model_dir, tmp_path):
    from b2trl.images import BranchGridHook

    hook = BranchGridHook(num_branches=3, max_groups=2, output_dir=str(tmp_path / "png"))
    trainer = make_trainer(
        tiny_model_dir,
        hook=hook,
        log_with="tensorboard",
        project_kwargs={"project_dir": str(tmp_path), "logging_dir": str(tmp_path / "tb")},
    )
    trainer.step(3, 7)
    trainer.accelerator.end_training()
    saved = list((tmp_path / "png").glob("branches_*.png"))
    # at the stage's index, the step its statistics are logged at (not the optimizer step)
    assert [p.name for p in saved] == ["branches_000003.png"]
    from PIL import Image

    width, height = Image.open(saved[0]).size
    assert width > 3 * 16 and height > 2 * 16  # three branches per row, two groups
    images = set()
    for run in {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run))
        events.Reload()
        images |= set(events.Tags()["images"])
    assert "branches" in images


def test_branch_grid_hook_without_a_tracker_or_folder_returns_the_grid(tiny_model_dir):
    from b2trl.images import BranchGridHook

    seen = []
    hook = BranchGridHook(num_branches=3)
    trainer = make_trainer(tiny_model_dir, hook=lambda data, step, tracker: seen.append(hook(data, step, tracker)))
    trainer.step(0, 0)
    assert seen and seen[0].size[0] > 0


def test_composite_reward_parts_are_logged_per_stage(tiny_model_dir):
    from b2trl.rewards import CompositeReward
    from helpers import brightness_reward

    def darkness(images, prompts, metadata):
        return 1 - images.float().mean(dim=(1, 2, 3)), {}

    trainer = make_trainer(tiny_model_dir, reward=CompositeReward({brightness_reward: 1.0, darkness: 0.5}))
    trainer.step(0, 0)
    stats = trainer.last_stage_stats
    parts = {k: v for k, v in stats.items() if k.startswith("reward/")}
    assert set(parts) == {"reward/brightness_reward", "reward/darkness"}, stats
    assert abs(parts["reward/brightness_reward"] + parts["reward/darkness"] - 1) < 1e-5
    # the stage's reward is the weighted sum of the parts
    expected = parts["reward/brightness_reward"] + 0.5 * parts["reward/darkness"]
    assert abs(stats["reward_mean"] - expected) < 1e-5
