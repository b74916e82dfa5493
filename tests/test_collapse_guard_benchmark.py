"""benchmarks/collapse_guard.py --quick: the demonstration's run record, and its evaluation equal to the study's."""

import json
from pathlib import Path

import pytest

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "collapse_guard.py"


def test_quick_run_records_the_guard_and_evaluates_as_the_study_does(tmp_path, capsys):
    script = load_script(SCRIPT, "collapse_guard")
    out = tmp_path / "guard.json"
    script.main(["--quick", "--out", str(out)])
    run = json.loads(out.read_text())["runs"]["rollback_seed0"]
    assert run["mode"] == "rollback" and run["num_stages"] == len(run["stages"])
    assert [p["stage"] for p in run["curve"]][0] == -1  # the base model, evaluated before training
    # the trainer's last evaluation (toy_alignment, fixed noise) equals the study's held-out evaluation of the weights
    # it ended with, image for image
    assert not run["events"] and run["final"] == pytest.approx(run["last_evaluation"], abs=1e-6)
    assert "| rollback | 0 |" in capsys.readouterr().out
    script.main(["--quick", "--out", str(out)])  # a rerun with the same settings skips the finished run
    assert "rollback_seed0: done already" in capsys.readouterr().out
