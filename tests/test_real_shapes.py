"""benchmarks/real_shapes.py writes into an existing record: the runs it redoes are replaced, the others kept."""

import json
from pathlib import Path

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_shapes.py"


def test_a_rerun_replaces_its_own_runs_and_keeps_the_others(tmp_path, monkeypatch):
    script = load_script(SCRIPT, "real_shapes")
    out = tmp_path / "shapes.json"
    old_machine = {"cpu": "an earlier one"}
    out.write_text(json.dumps({"machine": old_machine, "runs": [
        {"name": "sd15", "peak_rss_gib": 1.0, "machine": old_machine},
        {"name": "sdxl", "peak_rss_gib": 2.0, "machine": old_machine}]}))
    measured = {"resolution": 512, "dtype": "bf16", "stage_seconds": 1.0, "peak_rss_gib": 3.0, "peak_training_gib": 3.0,
                "process_max_rss_gib": 3.0, "predicted": {"total_gib": 2.5}}
    monkeypatch.setattr(script, "run", lambda name, threads: {"name": name, **measured})
    script.main(["--runs", "sdxl", "--out", str(out), "--threads", "1"])
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["runs"]] == ["sd15", "sdxl"]
    assert record["runs"][0] == {"name": "sd15", "peak_rss_gib": 1.0, "machine": old_machine}  # kept as it was
    assert record["runs"][1]["peak_rss_gib"] == 3.0 and record["runs"][1]["machine"] == record["machine"]
    assert record["machine"] != old_machine
    assert record["machine"]["torch_threads"] == 1  # what the measured child process ran with
