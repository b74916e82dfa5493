"""The README's main job, as shipped (toy preset, training seed 0, evaluation seeds 0-2): B²-DiffuRL raises the
toy model's held-out alignment. About 1.5 minutes on one CPU thread."""

import json
from pathlib import Path

from helpers import load_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sd.py"


def test_main_job_raises_held_out_alignment(tmp_path):
    module = load_script(EXAMPLE, "train_sd_learning")

    out = tmp_path / "run"
    module.main(["--output_dir", str(out)])  # no training flags: the toy preset
    evaluation = json.loads((out / "evaluation.json").read_text())
    base, trained = evaluation["base"], evaluation["trained"]
    # the same 45 held-out prompts and the same starting noise before and after
    assert trained["num_images"] == base["num_images"] == 45 * 3
    assert trained["overall"] >= base["overall"] + 0.01, (base["overall"], trained["overall"])
    # what it fixes is drawing: squares that read as circles, stray specks of a second colour
    assert trained["per_attribute"]["shape_b"] > base["per_attribute"]["shape_b"]
    stages = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(stages) == 10 and stages[-1]["interval_length"] == 20  # one pass of the backward schedule
