"""benchmarks/study_v3.py: the equal-compute budget, a --quick run of the relation task end to end (budget reached,
evaluation points, resuming), what each study method is, and the report's computed facts on synthetic runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return load_script(REPO / "benchmarks" / "study_v3.py", "study_v3")


@pytest.fixture(scope="module")
def report():
    return load_script(REPO / "benchmarks" / "study_v3_report.py", "study_v3_report")


@pytest.fixture(scope="module")
def quick_relation(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("study_v3")
    threads = torch.get_num_threads()
    try:
        study.main(["--task", "relation", "--methods", "b2_start_pairs", "--seeds", "0", "--quick", "--threads",
                    str(threads), "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def test_budget_is_study_v2_ddpo_run_counted_as_the_trainer_counts(study):
    from b2trl.compute import TRAINING_ROW_COST

    settings = study.method_settings("ddpo", "sd")
    sampled = 1920 * 20 * 2  # every image, every step, guidance doubles the rows
    assert study.budget_rows(settings) == pytest.approx(sampled + 2 * sampled * TRAINING_ROW_COST)
    assert study.budget_rows(settings) == pytest.approx(445_440)


def test_every_task_method_is_a_preset_with_the_toy_scale_on_top(study):
    for task, models in study.TASKS.items():
        for model, methods in models.items():
            for method in methods:
                config = study.build_config(study.method_settings(method, model), 0, 5, "/nonexistent")
                assert config.sample_num_steps == 20 and config.sample_num_batches_per_epoch == 1, method
                assert config.train_learning_rate == study.MODEL_SETTINGS[model]["train_learning_rate"]
                images = config.sample_batch_size * config.num_branches
                assert images == 64, (method, images)  # 64 images a stage, every method
    b2 = study.build_config(study.method_settings("b2", "sd"), 0, 5, "/nonexistent")
    assert b2.selection_rule == "best_worst"  # the paper's run, not the trainer's default
    start = study.build_config(study.method_settings("b2_start_pairs", "sd"), 0, 5, "/nonexistent")
    assert start.selection_rule == "pairs" and start.interval_schedule.anchor == "start"
    # a changed setting is a different run
    assert study.fingerprint("relation", "sd", "b2_pairs", 0) != study.fingerprint("relation", "sd", "b2_pairs", 1)
    assert study.fingerprint("relation", "sd", "b2_pairs", 0) != study.fingerprint("alignment", "sd", "b2_pairs", 0)


def test_relation_task_scores_the_relation_attribute_on_relation_prompts(study):
    import b2trl.toy as toy

    reward, train, held_out = study.task_data("relation")
    assert train and held_out and not set(train) & set(held_out)
    assert {toy.parse_prompt(p).template for p in train + held_out} == {"relation"}
    from b2trl.toy.reward import score_attributes

    batch = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores, _ = reward(batch, held_out[:3])
    expected = score_attributes(batch, held_out[:3])[0][:, 4]
    assert torch.equal(scores, expected.float()) and set(scores.tolist()) <= {0.0, 1.0}


def test_quick_relation_run_reaches_its_budget_and_is_skipped_when_rerun(study, quick_relation, capsys):
    runs = quick_relation / "relation_sd" / "runs"
    record = json.loads((runs / "b2_start_pairs_seed0.json").read_text())
    assert record["status"] == "done" and record["task"] == "relation"
    labels = [p["label"] for p in record["curve"]]
    assert labels[0] == "start" and labels[-4:] == [f"compute {k}/4" for k in range(1, 5)]
    assert record["final"]["compute_rows"] >= record["budget_rows"]
    assert record["budget_rows"] == pytest.approx(study.budget_rows(record["settings"]) / 200)
    counted = [s["compute/denoiser_rows"] for s in record["stages"]]
    assert counted == sorted(counted) and counted[-1] == record["final"]["compute_rows"]
    assert record["images"] == 64 * record["stages_trained"]
    import b2trl.toy as toy

    assert {toy.parse_prompt(p).template for p in record["eval_prompts"]} == {"relation"}
    assert not (runs / "b2_start_pairs_seed0.partial.json").exists()
    assert not list(runs.glob("*.lock"))

    study.main(["--task", "relation", "--methods", "b2_start_pairs", "--seeds", "0", "--quick",
                "--threads", str(torch.get_num_threads()), "--output_dir", str(quick_relation)])
    assert "skip b2_start_pairs_seed0: finished" in capsys.readouterr().out
    page = (quick_relation / "study_v3.md").read_text()
    assert "## Relation order, SD toy model" in page and "`b2_start_pairs`" in page


def test_quick_needs_its_own_output_dir(study):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match="--output_dir"):
        study.main(["--task", "relation", "--quick", "--threads", "1"])
    assert torch.get_num_threads() == threads  # refused before anything changed


# ------------------------------------------------------------------------------------------------ the report


def _point(label, score, images, rows, relation=None, num_images=100):
    return {"label": label, "overall": score, "images": images, "compute_rows": rows, "diversity": 50.0,
            "per_attribute": {"relation": score if relation is None else relation}, "num_images": num_images}


def _run(task, method, seed, scores, images_per_point, budget=400_000.0, status="done"):
    labels = ["start", *[f"compute {k}/4" for k in range(1, 5)]]
    curve = [_point(lab, s, n, budget * k / 4) for k, (lab, s, n) in enumerate(zip(labels, scores, images_per_point))]
    if images_per_point[1] > 640:  # the image point falls before the first compute point
        curve.insert(1, _point("640 images", scores[1] - 0.01, 640, budget / 8))
    return {"task": task, "model": "sd", "method": method, "seed": seed, "status": status, "budget_rows": budget,
            "curve": curve, "final": curve[-1], "images": images_per_point[-1], "wall_seconds": 10.0}


def test_report_tables_collapses_reach_and_relation_standard_error(report, tmp_path):
    runs = tmp_path / "relation_sd" / "runs"
    runs.mkdir(parents=True)
    base = 0.4
    for seed, finals in enumerate([0.50, 0.56, 0.53]):  # mean +0.13: more than twice the base's SE (0.049)
        report_run = _run("relation", "cheap", seed, [base, 0.45, 0.47, 0.5, finals], [0, 800, 1600, 2400, 3200])
        (runs / f"cheap_seed{seed}.json").write_text(json.dumps(report_run))
    for seed, finals in enumerate([0.1, 0.41, 0.42]):  # one collapse; mean change -0.09: within 2 SE
        report_run = _run("relation", "dear", seed, [base, 0.4, 0.4, 0.4, finals], [0, 160, 320, 480, 640])
        (runs / f"dear_seed{seed}.json").write_text(json.dumps(report_run))
    for seed, finals in enumerate([0.25, 0.25, 0.28]):  # mean change -0.14: moved, the wrong way
        report_run = _run("relation", "worse", seed, [base, 0.4, 0.3, 0.3, finals], [0, 160, 320, 480, 640])
        (runs / f"worse_seed{seed}.json").write_text(json.dumps(report_run))
    (runs / "dear_seed3.partial.json").write_text(json.dumps(_run("relation", "dear", 3, [base] * 5, [0] * 5)))
    running = _run("relation", "dear", 4, [base, 0.9, 0.9, 0.9, 0.9], [0, 1, 2, 3, 4], status="running")
    (runs / "dear_seed4.json").write_text(json.dumps(running))

    page = report.write_report(tmp_path, tmp_path / "page.md", order=["dear", "cheap"])
    text = page.read_text()
    se = np.sqrt(0.4 * 0.6 / 100)
    assert f"standard error {se:.3f}" in text and f"more than {2 * se:.3f}" in text
    equal_compute, equal_images = text.split("### At equal compute")[1].split("### At equal images")
    rows = {line.split("|")[1].strip(): line for line in equal_compute.splitlines() if line.startswith("| `")}
    dear, cheap = rows["`dear`"], rows["`cheap`"]
    assert equal_compute.index("| `dear`") < equal_compute.index("| `cheap`")  # the given order
    assert dear.startswith("| `dear` | 3 | 0.400 ± 0.000 |")  # the partial and the running record are left out
    assert "| 1 of 3 |" in dear and "| not reached |" in dear
    assert dear.endswith(f"| {np.mean([0.1, 0.41, 0.42]) - base:+.3f} (within 2 SE) |")
    assert f"| {np.mean([0.5, 0.56, 0.53]):.3f} ± {np.std([0.5, 0.56, 0.53], ddof=1):.3f} |" in cheap
    assert "| 3,200 | 0 of 3 |" in cheap  # images at the budget, no collapse
    assert "| 100k |" in cheap  # base + 0.05 = 0.45 first reached at 1/4 of the budget
    assert cheap.endswith(f"| {np.mean([0.5, 0.56, 0.53]) - base:+.3f} (moved up) |")
    assert rows["`worse`"].endswith(f"| {np.mean([0.25, 0.25, 0.28]) - base:+.3f} (moved down) |")
    assert "| `dear` | — (budget spent before) | — (budget spent before) | — (budget spent before) |" in equal_images
    assert "| `cheap` | 0.440 ± 0.000 | — (budget spent before) |" in equal_images
    assert "_Not written yet._" in text

    page.write_text(text.replace("_Not written yet._", "Written by hand."))
    report.write_report(tmp_path, page, order=["dear", "cheap"])
    assert "Written by hand." in page.read_text()


def test_alignment_report_has_no_standard_error_column(report, tmp_path):
    runs = tmp_path / "alignment_sd" / "runs"
    runs.mkdir(parents=True)
    (runs / "b2_seed0.json").write_text(json.dumps(_run("alignment", "b2", 0, [0.8, 0.9, 0.9, 0.9, 0.9],
                                                         [0, 800, 1600, 2400, 3200])))
    text = report.write_report(tmp_path, tmp_path / "page.md").read_text()
    assert "standard error" not in text and "change at budget" not in text
    assert "| `b2` | 1 | 0.900 |" in text and "| 100k |" in text  # reached base + 0.05 at 1/4 of the budget
