"""benchmarks/toy_study.py: the --quick study end to end (equal budgets, resuming, the report), its settings
overrides, and the report's computed facts on synthetic runs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "toy_study.py"


@pytest.fixture(scope="module")
def toy_study():
    return load_script(SCRIPT, "toy_study")


@pytest.fixture(scope="module")
def quick_dir(toy_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_study")
    toy_study.main(["--quick", "--output_dir", str(out)])
    return out


def _runs(out, methods):
    return {m: json.loads((out / "runs" / f"{m}_seed0.json").read_text()) for m in methods}


# ------------------------------------------------------------------------------------------------ the quick study


def test_quick_study_gives_every_method_the_same_budget_and_evaluation_points(toy_study, quick_dir):
    runs = _runs(quick_dir, toy_study.METHODS)
    budget = toy_study.QUICK["study"]["budget_images"]
    grids = {m: [p["images"] for p in r["curve"]] for m, r in runs.items()}
    for m, r in runs.items():
        assert r["status"] == "done" and r["quick"]
        assert grids[m][0] == 0 and grids[m][-1] == budget, m
        assert r["stages"][-1]["images"] == budget
        assert sum(r["images_per_stage"] for _ in r["stages"]) == budget
        assert r["final"]["images"] == budget
        assert r["wall"]["train_seconds"] > 0 and r["wall"]["sample_seconds"] > 0
    assert len({tuple(g) for g in grids.values()}) == 1, grids
    # the same base model and evaluation noise: every run starts from the same held-out score
    starts = [r["curve"][0]["overall"] for r in runs.values()]
    assert max(starts) - min(starts) < 1e-6
    assert not (quick_dir / "runs" / "b2_seed0.partial.json").exists()


def test_quick_study_runs_what_each_method_is(toy_study, quick_dir):
    runs = _runs(quick_dir, toy_study.METHODS)
    settings = {m: r["settings"] for m, r in runs.items()}
    assert settings["ddpo"]["trainer"] == "ddpo" and settings["ddpo"]["per_prompt_stat_tracking"]
    assert settings["b2_no_schedule"]["interval_schedule"]["initial_length"] == settings["b2"]["sample_num_steps"]
    assert settings["b2_no_branching"]["num_branches"] == 1 and settings["b2_no_branching"]["selection_rule"] == "all"
    # B² records its schedule per stage; with one branch every sample is its own group
    assert [s["interval_length"] for s in runs["b2"]["stages"]] == [14, 17]
    assert all(s["interval_length"] == 20 for s in runs["b2_no_schedule"]["stages"])
    # anchored at the start: the same lengths, trained from step 0
    assert settings["b2_start"]["interval_schedule"]["anchor"] == "start"
    assert [(s["branch_point"], s["interval_end"]) for s in runs["b2_start"]["stages"]] == [(0, 14), (0, 17)]
    assert [(s["branch_point"], s["interval_end"]) for s in runs["b2"]["stages"]] == [(6, 20), (3, 20)]
    assert all(s["groups_total"] == 4 for s in runs["b2_no_branching"]["stages"])
    assert "interval_length" not in runs["ddpo"]["stages"][0]
    assert runs["ddpo"]["stages"][0]["optimizer_steps"] > 0
    # the DPO methods train pairs: d3po's pairs share only the initial noise and train the whole trajectory
    assert settings["b2_dpo"]["loss_type"] == settings["d3po"]["loss_type"] == "dpo"
    assert all(s["interval_length"] == 20 and s["branch_point"] == 0 for s in runs["d3po"]["stages"])
    pair_stages = runs["d3po"]["stages"] + runs["b2_dpo"]["stages"]
    assert all(s["samples_kept"] == 2 * s["pairs_kept"] for s in pair_stages)


def test_quick_report_lists_every_method_and_stays_out_of_docs(toy_study, quick_dir):
    text = (quick_dir / "study.md").read_text()
    for m in toy_study.METHODS:
        assert f"| `{m}` |" in text
    assert "## What the numbers say" in text and "--quick" in text
    assert (quick_dir / "img" / "study_alignment.png").stat().st_size > 0
    assert (quick_dir / "img" / "study_templates.png").stat().st_size > 0


def test_rerun_skips_finished_runs(toy_study, quick_dir, capsys):
    files = sorted((quick_dir / "runs").glob("*.json"))
    before = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    toy_study.main(["--quick", "--output_dir", str(quick_dir)])
    out = capsys.readouterr().out
    for m in toy_study.METHODS:
        assert f"skip {m}_seed0" in out
    assert "train " not in out
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert not list((quick_dir / "runs").glob("*.lock"))  # a skipped run's lock is released


def test_a_run_another_process_is_training_is_skipped(toy_study, quick_dir, capsys):
    lock = quick_dir / "runs" / "b2_seed1.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live process holds it
    capsys.readouterr()
    toy_study.main(["--quick", "--output_dir", str(quick_dir), "--methods", "b2", "--seeds", "1"])
    out = capsys.readouterr().out
    assert f"skip b2_seed1: process {os.getpid()} is training it" in out and "train b2_seed1" not in out
    assert lock.exists() and not (quick_dir / "runs" / "b2_seed1.json").exists()  # the holder's lock stays
    # a lock whose process has ended is taken over; one from another machine is respected
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    lock.write_text(json.dumps({"pid": ended.pid, "host": socket.gethostname()}))
    assert toy_study.lock_holder(lock) is None
    assert toy_study.claim_run(lock) is None and json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    assert "process 1 on elsewhere" in toy_study.claim_run(lock)
    lock.unlink()
    assert toy_study.claim_run(lock) is None and toy_study.claim_run(lock) == f"process {os.getpid()}"
    lock.unlink()


def test_a_changed_setting_retrains_only_that_run(toy_study, quick_dir, capsys):
    others = [quick_dir / "runs" / f"{m}_seed0.json" for m in toy_study.METHODS if m != "b2"]
    before = {f: f.stat().st_mtime_ns for f in others}
    capsys.readouterr()
    toy_study.main(["--quick", "--output_dir", str(quick_dir), "--methods", "b2", "ddpo",
                    "--set", "b2.learning_rate=5e-4"])
    out = capsys.readouterr().out
    assert "b2_seed0: settings changed" in out and "train b2_seed0" in out
    assert "skip ddpo_seed0" in out and "train ddpo_seed0" not in out
    assert (quick_dir / "runs" / "b2_seed0.json.stale").exists()
    assert _runs(quick_dir, ["b2"])["b2"]["settings"]["train_learning_rate"] == 5e-4
    assert before[quick_dir / "runs" / "ddpo_seed0.json"] == (quick_dir / "runs" / "ddpo_seed0.json").stat().st_mtime_ns


def test_quick_flow_study_trains_the_flow_toy_model_and_writes_its_own_page(toy_study, tmp_path, capsys):
    with pytest.raises(SystemExit, match="ddpo .*DDIM only"):
        toy_study.main(["--quick", "--model", "sd3", "--output_dir", str(tmp_path), "--methods", "b2", "ddpo"])
    toy_study.main(["--quick", "--model", "sd3", "--output_dir", str(tmp_path), "--methods", "b2", "b2_start"])
    runs = _runs(tmp_path, ["b2", "b2_start"])
    for run in runs.values():
        assert run["study"]["model"] == "sd3" and run["settings"]["noise_level"] == 0.7
        assert run["settings"]["train_learning_rate"] == toy_study.FLOW["shared"]["train_learning_rate"]
        assert run["status"] == "done" and run["lora_max_change"] > 0
    assert runs["b2_start"]["stages"][0]["branch_point"] == 0
    text = (tmp_path / "study_flow.md").read_text()
    assert "flow toy model" in text and "| `b2_start` |" in text and "first L 14" in text
    assert (tmp_path / "img" / "study_flow_alignment.png").stat().st_size > 0


def test_quick_never_writes_into_docs(toy_study, tmp_path):
    with pytest.raises(SystemExit, match="docs"):
        toy_study.main(["--quick", "--output_dir", str(tmp_path), "--report_dir", str(REPO / "docs")])
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ settings


def test_overrides_reach_the_methods_built_on_them(toy_study):
    settings = toy_study.load_settings(False, '{"shared": {"train_num_inner_epochs": 1}}',
                                       ["b2.learning_rate=3e-4", "b2.interval_schedule.initial_length=16",
                                        "ddpo.sample_batch_size=32", "ddpo.sample_num_batches_per_epoch=2"])
    resolved = {m: toy_study.resolve_method(settings, m) for m in toy_study.METHODS}
    assert resolved["b2"]["train_learning_rate"] == 3e-4 == resolved["b2_no_branching"]["train_learning_rate"]
    assert resolved["ddpo"]["train_learning_rate"] == toy_study.SETTINGS["shared"]["train_learning_rate"]
    assert {r["train_num_inner_epochs"] for r in resolved.values()} == {1}
    assert resolved["b2"]["interval_schedule"] == {"initial_length": 16, "num_stages": 30}
    assert resolved["b2_start"]["interval_schedule"] == {"initial_length": 16, "num_stages": 30, "anchor": "start"}
    assert resolved["b2_no_schedule"]["interval_schedule"]["initial_length"] == 20  # "T" follows the steps
    assert {toy_study.images_per_stage(r) for r in resolved.values()} == {64}
    toy_study.check_budget(settings["study"], resolved)


def test_only_the_study_as_defined_reports_into_docs(toy_study, tmp_path):
    out = tmp_path / "runs_here"
    where = lambda *argv: toy_study.default_report_dir(toy_study.parse_args(list(argv)), out)  # noqa: E731
    assert where() == REPO / "docs" and where("--seeds", "3", "4", "--methods", "b2") == REPO / "docs"
    assert where("--quick") == out
    for changed in (["--set", "b2.num_branches=8"], ["--settings_json", "{}"], ["--budget_images", "640"],
                    ["--eval_every_images", "320"]):
        assert where(*changed) == out, changed


def test_bad_overrides_fail_before_any_training(toy_study):
    with pytest.raises(SystemExit, match="did you mean b2.num_branches"):
        toy_study.load_settings(False, None, ["b2.num_branch=3"])
    with pytest.raises(SystemExit, match="set by the study"):
        toy_study.load_settings(False, None, ["b2.seed=3"])
    settings = toy_study.load_settings(False, None, ["b2.num_branches=3"])
    resolved = {m: toy_study.resolve_method(settings, m) for m in toy_study.METHODS}
    with pytest.raises(SystemExit, match="b2 samples 48 images per stage"):
        toy_study.check_budget(settings["study"], resolved)


# ------------------------------------------------------------------------------------------------ the report


def _fake_run(method, seed, finals, base=0.80):
    """A finished run record whose held-out alignment climbs linearly from `base` to `finals[seed]`."""
    final = finals[seed]
    curve = []
    for i, images in enumerate((0, 64, 128)):
        value = base + (final - base) * i / 2
        curve.append({"images": images, "overall": value, "per_template": {t: value for t in ("single", "binding",
                      "relation")}, "per_attribute": {"relation": value / 2}, "diversity": 60.0 - i})
    trainer = "ddpo" if method == "ddpo" else "b2"
    return {
        "method": method, "seed": seed, "status": "done", "quick": False, "images_per_stage": 64,
        "study": {"budget_images": 128, "eval_every_images": 64, "eval_seeds": [0, 1, 2]},
        "eval_prompts": ["p"] * 45, "curve": curve, "final": curve[-1], "lora_max_change": 0.01,
        "wall": {"train_seconds": 100.0 if trainer == "ddpo" else 50.0, "sample_seconds": 20.0},
        "settings": {"trainer": trainer, "sample_batch_size": 16, "num_branches": 4, "selection_rule": "best_worst",
                     "selection_threshold_best": 0.5, "selection_threshold_worst": -0.5, "sample_num_steps": 20,
                     "interval_schedule": {"initial_length": 14, "num_stages": 10}},
        "command": "python benchmarks/toy_study.py", "finished_at": "2025-01-01T00:00:00+00:00",
        "machine": {"cpu": "cpu", "cpu_count": 2, "cpus_usable": 2, "torch_threads": 1, "system": "Linux",
                    "python": "3", "torch": "2", "diffusers": "0", "trl": "0", "load_average_at_start": 1.0},
    }


def _write_fake_runs(runs_dir, report, quick=False):
    runs_dir.mkdir(parents=True)
    finals = {"b2": [0.90, 0.92, 0.94], "ddpo": [0.84, 0.85, 0.86]}
    for method, values in finals.items():
        for seed in range(3):
            record = _fake_run(method, seed, values)
            record["quick"] = quick
            report.write_json(runs_dir / f"{method}_seed{seed}.json", record)
    report.write_json(runs_dir / "b2_seed3.partial.json", {**_fake_run("b2", 0, [0.1]), "status": "running"})


def test_report_states_computed_facts_and_keeps_the_interpretation(toy_study, tmp_path):
    report = toy_study.report
    _write_fake_runs(tmp_path / "runs", report)
    md = report.write_report(tmp_path / "runs", tmp_path / "page", "python benchmarks/toy_study.py", False,
                             toy_study.METHODS)
    text = md.read_text()
    facts = text.split("## What the numbers say")[1].split("### Interpretation")[0]
    assert "highest mean held-out alignment is b2's, 0.920 ± 0.020 (3 seeds), 0.070 above the next, ddpo" in facts
    assert "[0.900, 0.940] and [0.840, 0.860] do not overlap" in facts
    assert "b2: 0.800 → 0.920 (+0.120); 3 of 3 seeds end above the base." in facts
    assert "first reaches ddpo's final mean (0.850) at 64 sampled images (50% of the budget)" in facts
    assert "b2 50 s (×0.50), ddpo 100 s (×1.00)" in facts
    assert "| `b2` | 3 | 128 | 0.920 ± 0.020 [0.900, 0.940]" in text  # the partial run is left out
    assert "_Not written yet._" in text

    md.write_text(text.replace("_Not written yet._", "B² is ahead here because ..."))
    report.write_report(tmp_path / "runs", tmp_path / "page", "python benchmarks/toy_study.py --report", False)
    regenerated = md.read_text()
    assert "B² is ahead here because ..." in regenerated and "_Not written yet._" not in regenerated
    assert "python benchmarks/toy_study.py --report" in regenerated


def test_report_refuses_quick_runs_for_the_docs(toy_study, tmp_path):
    _write_fake_runs(tmp_path / "runs", toy_study.report, quick=True)
    with pytest.raises(SystemExit, match="--quick"):
        toy_study.report.write_report(tmp_path / "runs", tmp_path / "page", "cmd", allow_quick=False)
