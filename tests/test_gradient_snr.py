"""benchmarks/gradient_snr.py: one stage's policy gradient is reproducible from its seed, and the report's
cosines are between independent stages."""

from pathlib import Path

import pytest
import torch

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_snr.py"


@pytest.fixture(scope="module")
def snr():
    return load_script(SCRIPT, "gradient_snr")


def test_a_stage_gradient_depends_only_on_its_seed(snr):
    trainer = snr.make_trainer(prompts_per_stage=4, num_branches=3, rule="all")
    g1, kept, _ = snr.stage_gradient(trainer, branch_point=0, seed=3)
    g2, _, _ = snr.stage_gradient(trainer, branch_point=0, seed=3)
    g3, _, _ = snr.stage_gradient(trainer, branch_point=0, seed=4)
    assert kept == 12 and g1.norm() > 0
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0) > 0.999
    assert torch.nn.functional.cosine_similarity(g1, g3, dim=0) < 0.999


def test_report_has_one_cosine_per_pair_of_stages(snr, capsys):
    results = snr.main(["--branch_points", "16", "--prompts_per_stage", "2", "--num_branches", "2",
                        "--repeats", "3", "--threads", "1"])
    (row,) = results
    assert row["branch_point"] == 16 and len(row["cosines"]) == 3
    assert all(-1.0 <= c <= 1.0 for c in row["cosines"])
    assert abs(row["mean_cosine"] - sum(row["cosines"]) / 3) < 1e-9
    assert "| 16 | 4 |" in capsys.readouterr().out
