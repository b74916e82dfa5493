import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from b2trl import checkpoint as ckpt
from b2trl.models.base import LORA_FILE
from helpers import lora_params, make_trainer, max_change

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def _trainer(model_dir, project, **overrides):
    return make_trainer(model_dir, save_freq=1, project_kwargs={"project_dir": str(project)},
                        train_learning_rate=1e-2, **overrides)


def test_resume_restores_stage_optimizer_history_and_keeps_training(tiny_model_dir, tmp_path):
    first = _trainer(tiny_model_dir, tmp_path, num_epochs=2)
    first.train()
    trained = lora_params(first.sd_pipeline)
    history = first.rule.history.stats()

    resumed = _trainer(tiny_model_dir, tmp_path, num_epochs=4, resume_from="latest")
    assert resumed.first_epoch == 2 and resumed.global_step == first.global_step
    assert resumed.rule.history.stats() == history
    assert max_change(trained, lora_params(resumed.sd_pipeline)) == 0  # the LoRA weights came back
    assert list(resumed.sd_pipeline.unet.peft_config) == ["default"]  # into the one adapter, not a second
    opt_first, opt_resumed = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert opt_first.keys() == opt_resumed.keys()
    for k in opt_first:
        torch.testing.assert_close(opt_first[k]["exp_avg"], opt_resumed[k]["exp_avg"])

    resumed.train()
    assert resumed.last_stage_stats["stage"] == 3
    assert max_change(trained, lora_params(resumed.sd_pipeline)) > 0  # TRL's resume trains nothing here


def test_latest_skips_partial_and_unmarked_checkpoints(tiny_model_dir, tmp_path):
    _trainer(tiny_model_dir, tmp_path, num_epochs=2).train()
    root = tmp_path / "checkpoints"
    (root / ".partial_checkpoint_5").mkdir()
    (root / "checkpoint_7").mkdir()  # a folder without the marker: never picked up
    assert ckpt.resolve_resume_path("latest", str(root)) == str(root / "checkpoint_1")
    assert ckpt.resolve_resume_path(str(tmp_path), "unused") == str(root / "checkpoint_1")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume_path(str(root / "checkpoint_7"), "unused")


def test_a_failed_save_leaves_the_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_dir, tmp_path, num_epochs=3)
    trainer.train(epochs=1)
    good = tmp_path / "checkpoints" / "checkpoint_0"
    before = sorted(os.listdir(good))

    def disk_full(output_dir=None, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="stage 1.*last complete checkpoint is .*checkpoint_0"):
        trainer.train(epochs=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_0"]
    assert sorted(os.listdir(good)) == before and ckpt.is_complete(str(good))


def test_continue_training_from_a_saved_lora(tiny_model_dir, tmp_path):
    first = _trainer(tiny_model_dir, tmp_path / "a", num_epochs=1)
    first.train()
    first.save_pretrained(str(tmp_path / "lora"))
    second = _trainer(tiny_model_dir, tmp_path / "b", num_epochs=1)
    second.load_lora_weights(str(tmp_path / "lora"))
    assert max_change(lora_params(first.sd_pipeline), lora_params(second.sd_pipeline)) == 0
    with pytest.raises(FileNotFoundError, match="No LoRA weights"):
        second.load_lora_weights(str(tmp_path))


def test_sigkill_mid_stage_then_resume(tiny_model_dir, tmp_path):
    project, stats = tmp_path / "run", tmp_path / "stats.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), tiny_model_dir, str(project), "--epochs", "8", "--sleep", "1.0",
           "--stats", str(stats)]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 150
    try:
        while not ckpt.is_complete(str(project / "checkpoints" / "checkpoint_1")):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the training process never wrote checkpoint_1"
            time.sleep(0.05)
        time.sleep(0.3)  # stage 2 is now sampling (each reward call takes a second)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    done = [json.loads(line)["stage"] for line in stats.read_text().splitlines()]
    assert done == [0, 1]  # stage 2 was in flight
    saved = load_file(str(project / "checkpoints" / "checkpoint_1" / LORA_FILE))

    resumed = _trainer(tiny_model_dir, project, num_epochs=3, resume_from="latest")
    assert resumed.first_epoch == 2
    at_checkpoint = lora_params(resumed.sd_pipeline)
    assert sum(v.numel() for v in saved.values()) == sum(v.numel() for v in at_checkpoint.values())
    resumed.train()
    stats_2 = resumed.last_stage_stats
    assert stats_2["stage"] == 2
    assert stats_2["interval_length"] == resumed.config.interval_schedule.length(2, resumed.config.sample_num_steps)
    assert max_change(at_checkpoint, lora_params(resumed.sd_pipeline)) > 0
    assert ckpt.is_complete(str(project / "checkpoints" / "checkpoint_2"))


@pytest.mark.parametrize("anchor", ["sliding", "random"])
def test_a_resumed_run_trains_the_same_windows_as_an_uninterrupted_one(tiny_model_dir, tmp_path, anchor):
    from b2trl import IntervalSchedule

    schedule = IntervalSchedule(initial_length=2, anchor=anchor, shift_every=1, window_seed=7)

    def windows(trainer):
        seen = []
        trainer.stage_end_callbacks.append(lambda t, s: seen.append((s["stage"], s["branch_point"], s["interval_end"])))
        trainer.train()
        return seen

    whole = windows(_trainer(tiny_model_dir, tmp_path / "whole", num_epochs=4, interval_schedule=schedule))
    _trainer(tiny_model_dir, tmp_path / "cut", num_epochs=2, interval_schedule=schedule).train()
    rest = windows(_trainer(tiny_model_dir, tmp_path / "cut", num_epochs=4, interval_schedule=schedule,
                            resume_from="latest"))
    assert rest == whole[2:]
    assert [first for _, first, _ in whole] == [schedule.interval(k, 6)[0] for k in range(4)]
    assert all(end - first == 2 for _, first, end in whole)
