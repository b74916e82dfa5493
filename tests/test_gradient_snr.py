"""benchmarks/gradient_snr.py: one stage's policy gradient is reproducible from its seed and covers its
interval's steps, the report compares every (setup, position) cell at equal images per stage, and the standard
error of the mean pairwise cosine is the delete-one-stage jackknife's."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_snr.py"


@pytest.fixture(scope="module")
def snr():
    return load_script(SCRIPT, "gradient_snr")


def test_interval_positions(snr):
    assert snr.interval("early", 20, 6) == (0, 6)
    assert snr.interval("middle", 20, 6) == (7, 13)
    assert snr.interval("late", 20, 6) == (14, 20)
    assert snr.interval("middle", 6, 2) == (2, 4)
    with pytest.raises(ValueError):
        snr.interval("late", 6, 7)


def test_setups_sample_equal_images(snr):
    shapes = {name: snr.setup_shape(name, prompts_per_stage=3, num_branches=4) for name in snr.SETUPS}
    assert {s["prompts"] * s["branches"] for s in shapes.values()} == {12}
    assert shapes["b2"] == dict(prompts=3, branches=4, rule="best_worst", repeat=1)
    assert shapes["independent"] == dict(prompts=12, branches=1, rule="all", repeat=1)
    assert shapes["independent_groups"]["repeat"] == 4


def test_repeated_prompts(snr):
    source = iter(range(10))
    fn = snr.repeated(lambda: (f"p{next(source)}", {}), 3)
    assert [fn()[0] for _ in range(7)] == ["p0"] * 3 + ["p1"] * 3 + ["p2"]


def test_jackknife_matches_a_direct_computation(snr):
    n = 5
    pairs = list(itertools.combinations(range(n), 2))
    cosines = [0.30, -0.10, 0.05, 0.20, 0.00, 0.15, -0.25, 0.40, 0.10, -0.05]
    by_pair = dict(zip(pairs, cosines))
    mean = sum(cosines) / len(cosines)
    # m_-i: the mean cosine of the pairs that leave stage i out
    loo = []
    for i in range(n):
        rest = [c for (a, b), c in by_pair.items() if i not in (a, b)]
        assert len(rest) == (n - 1) * (n - 2) // 2
        loo.append(sum(rest) / len(rest))
    m_bar = sum(loo) / n
    se = math.sqrt((n - 1) / n * sum((m - m_bar) ** 2 for m in loo))
    got_mean, got_se = snr.jackknife(cosines, n)
    assert got_mean == pytest.approx(mean, abs=1e-12)
    assert got_se == pytest.approx(se, abs=1e-12) and se > 0
    # equal cosines: no spread, no error; 3 stages: each m_-i is the one pair left
    assert snr.jackknife([0.2] * 6, 4) == pytest.approx((0.2, 0.0))
    assert snr.jackknife([0.1, 0.4, 0.7], 3)[1] == pytest.approx(math.sqrt(2 / 3 * (0.09 + 0 + 0.09)))
    with pytest.raises(ValueError):
        snr.jackknife([0.5], 2)
    with pytest.raises(ValueError):
        snr.jackknife([0.5, 0.1], 3)


def test_a_stage_gradient_depends_only_on_its_seed_and_records_its_interval(snr):
    trainer = snr.make_trainer(prompts_per_stage=4, num_branches=3, rule="all", num_steps=6)
    s1 = snr.stage_gradient(trainer, branch_point=0, seed=3, interval_end=2)
    s2 = snr.stage_gradient(trainer, branch_point=0, seed=3, interval_end=2)
    s3 = snr.stage_gradient(trainer, branch_point=0, seed=4, interval_end=2)
    assert s1.kept == 12 and s1.gradient.norm() > 0 and s1.steps == (0, 2)
    assert torch.nn.functional.cosine_similarity(s1.gradient, s2.gradient, dim=0) > 0.999
    assert torch.nn.functional.cosine_similarity(s1.gradient, s3.gradient, dim=0) < 0.999
    assert snr.stage_gradient(trainer, branch_point=3, seed=3, interval_end=5).steps == (3, 5)
    assert snr.stage_gradient(trainer, branch_point=4, seed=3).steps == (4, 6)


SMALL = ["--prompts_per_stage", "2", "--num_branches", "2", "--stages", "3", "--num_steps", "6",
         "--interval_length", "2", "--threads", "1"]


def test_report_compares_every_cell_at_equal_images(snr, tmp_path, capsys, monkeypatch):
    out = tmp_path / "snr.json"
    result = snr.main(SMALL + ["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cells = {(c["position"], c["setup"]): c for c in result["cells"]}
    assert set(cells) == set(itertools.product(snr.POSITIONS, snr.DEFAULT_SETUPS))
    assert result["stages"] == 3
    assert {c["images_per_stage"] for c in cells.values()} == {4}
    independent = cells["early", "independent"]
    assert (independent["prompts_per_stage"], independent["num_branches"]) == (4, 1)
    expected = {"early": [0, 2], "middle": [2, 4], "late": [4, 6]}
    for (position, setup), cell in cells.items():
        assert cell["steps"] == expected[position]
        assert cell["recorded_steps"] == [expected[position]] * 3  # read back from each stage's samples
        assert len(cell["kept"]) == 3 and len(cell["cosines"]) == 3 and cell["seeds"] == [0, 1, 2]
        assert all(-1.0 <= c <= 1.0 for c in cell["cosines"])
        assert (cell["mean_cosine"], cell["se"]) == pytest.approx(snr.jackknife(cell["cosines"], 3))
        assert cell["stages_for_target_se"] == math.ceil(3 * (cell["se"] / 0.03) ** 2)
        assert all(0 <= t <= k for t, k in zip(cell["trained"], cell["kept"]))
        if setup == "b2_all":  # every branch kept
            assert cell["kept"] == [4, 4, 4]
    # stage for stage, b2 and b2_all draw the very same samples; only the selection differs
    for position in snr.POSITIONS:
        assert cells[position, "b2"]["reward_mean"] == cells[position, "b2_all"]["reward_mean"]
    printed = capsys.readouterr().out
    assert "| position | steps | setup | images/stage | kept/stage | mean cosine ± SE |" in printed
    assert "| early | [0, 2) | b2 | 4 |" in printed and "| late | [4, 6) | independent | 4 |" in printed
    assert "3 stages per cell. SE <= 0.03 in every cell: " in printed

    # a stopped run resumes: the cells already in --out are taken as they are, only the missing ones are measured
    measured = []
    real = snr.measure_cell

    def counting(trainer, setup, start, end, seeds):
        measured.append((start, setup["rule"]))
        return real(trainer, setup, start, end, seeds)

    monkeypatch.setattr(snr, "measure_cell", counting)
    stopped = json.loads(out.read_text())
    stopped["cells"] = stopped["cells"][:4]  # as the file stood after the fourth cell
    out.write_text(json.dumps(stopped))
    resumed = snr.main(SMALL + ["--out", str(out)])
    assert len(measured) == len(result["cells"]) - 4
    assert [c["mean_cosine"] for c in resumed["cells"]] == pytest.approx([c["mean_cosine"] for c in result["cells"]],
                                                                         abs=1e-6)
    assert json.loads(out.read_text())["cells"] == json.loads(json.dumps(resumed["cells"]))
    assert "(from snr.json)" in capsys.readouterr().out
    # a run of fewer cells with the same settings measures nothing new and keeps the file's other cells
    measured.clear()
    subset = snr.main(SMALL + ["--out", str(out), "--positions", "early", "--setups", "b2"])
    assert measured == [] and len(subset["cells"]) == len(result["cells"])
    assert json.loads(out.read_text())["cells"] == json.loads(json.dumps(subset["cells"]))
    assert "other cells of snr.json kept as they were" in capsys.readouterr().out
    # other measurement settings: nothing is reused
    measured.clear()
    snr.main(SMALL[:4] + ["--stages", "4"] + SMALL[6:] + ["--out", str(out), "--positions", "early",
                                                          "--setups", "b2"])
    assert measured == [(0, "best_worst")]
    assert "measured with other settings (stages)" in capsys.readouterr().out
    assert json.loads((tmp_path / "snr.stale.json").read_text())["cells"] == json.loads(json.dumps(subset["cells"]))
    assert len(json.loads(out.read_text())["cells"]) == 1
