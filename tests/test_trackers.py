"""Every tracker gets the stage statistics, the evaluation metrics, the branch grid and the evaluation grid, all at
the stage's index: TensorBoard, Weights & Biases (offline) and Trackio (local)."""

import json
from pathlib import Path

import pytest

from b2trl.images import BranchGridHook
from b2trl.trackers import log_image
from helpers import make_trainer

STAGES = 2


def _train(model_dir, tmp_path, log_with, **overrides):
    trainer = make_trainer(
        model_dir, hook=BranchGridHook(num_branches=3, max_groups=2), log_with=log_with, num_epochs=STAGES,
        eval_every=1, eval_prompts=["a cat", "a dog"], eval_seeds=[0, 1],
        project_kwargs={"project_dir": str(tmp_path), "logging_dir": str(tmp_path / "logs")}, **overrides,
    )
    trainer.train()
    trainer.accelerator.end_training()
    return trainer


def test_log_image_skips_trackers_it_does_not_know():
    from PIL import Image

    class Other:
        name = "comet_ml"

    assert log_image(None, "x", Image.new("RGB", (4, 4)), 0) == []
    assert log_image([Other()], "x", Image.new("RGB", (4, 4)), 0) == []


def test_tensorboard_gets_scalars_and_both_grids(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tiny_model_dir, tmp_path, "tensorboard")
    scalars, images = {}, {}
    for run in {p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        scalars.update({tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]})
        images.update({tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]})
    steps = list(range(STAGES))
    assert scalars["reward_mean"] == steps and scalars["eval/reward"] == steps
    assert images["branches"] == steps and images["eval/grid"] == steps


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``.wandb`` file (LevelDB's log format: 32 KiB blocks
    of records with a 7-byte header, after a 7-byte file header; each record a protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, records, pending = run_file.read_bytes(), 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_gets_scalars_and_both_grids(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    _train(tiny_model_dir, tmp_path, "wandb", tracker_kwargs={"wandb": {"dir": str(tmp_path)}})
    wandb.teardown()  # the W&B service writes the run file in the background: wait for it to finish
    run_file, = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == list(range(STAGES))  # nothing was dropped for logging to an earlier step
    for step, row in by_step.items():
        assert isinstance(row["reward_mean"], float) and isinstance(row["eval/reward"], float)
        for key in ("branches", "eval/grid"):
            assert row[f"{key}/_type"] == "image-file"
            assert (run_file.parent / "files" / row[f"{key}/path"]).is_file()


def test_trackio_locally_gets_scalars_and_both_grids(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    project = f"b2trl-test-{tmp_path.name}"
    _train(tiny_model_dir, tmp_path, "trackio", tracker_project_name=project)
    run, = SQLiteStorage.get_runs(project)
    logs = SQLiteStorage.get_logs(project, run)
    by_step = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    assert sorted(by_step) == list(range(STAGES))
    for row in by_step.values():
        assert isinstance(row["reward_mean"], float) and isinstance(row["eval/reward"], float)
        assert row["branches"]["_type"] == row["eval/grid"]["_type"] == "trackio.image"
