"""The README's main job as shipped (toy preset, no flags): it runs one pass of the backward schedule, saves a
LoRA that changes the samples, and scores base and trained pipelines on exactly the same held-out images' noise.
About 1.5 minutes on one CPU thread.

Whether the trained score is above the base score depends on the training seed at this budget (the study in
docs/study.md has three seeds), so this test checks the job, not a gain."""

import json
from pathlib import Path

from helpers import load_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sd.py"


def test_main_job_trains_one_schedule_pass_and_scores_paired_samples(tmp_path):
    module = load_script(EXAMPLE, "train_sd_main_job")
    out = tmp_path / "run"
    module.main(["--output_dir", str(out)])  # no training flags: the toy preset
    evaluation = json.loads((out / "evaluation.json").read_text())
    base, trained = evaluation["base"], evaluation["trained"]
    # the same 45 held-out prompts and the same starting noise before and after
    assert trained["num_images"] == base["num_images"] == 45 * 3
    assert base["per_prompt"].keys() == trained["per_prompt"].keys()
    # the LoRA was trained and loaded: some samples, drawn from the same noise, now score differently
    assert any(base["per_prompt"][p] != trained["per_prompt"][p] for p in base["per_prompt"])
    stages = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["interval_length"] for s in stages][::3] == [14, 16, 18, 20]  # one pass: 14 of 20 steps .. all 20
    assert all(s["samples_kept"] > 0 for s in stages)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_alignment_base"] == base["overall"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "before_after_heldout.png").exists() and (out / "reward_curve.png").exists()
