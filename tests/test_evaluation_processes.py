"""Evaluation during training on two processes: the same metrics, best checkpoint and guard decisions on both, and
the same scores as one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, make_trainer

SCRIPT = Path(__file__).parent / "scripts" / "train_eval.py"


def test_two_processes_agree_on_every_evaluation_and_guard_decision(tiny_model_dir, tmp_path):
    project, prefix = tmp_path / "project", tmp_path / "stats"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(SCRIPT), tiny_model_dir, str(project), str(prefix), "--epochs", "4"]
    try:
        done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("two-process training with evaluation did not finish in 300 s (a hang)")
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [[json.loads(line) for line in Path(f"{prefix}.{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    for first, second in zip(*ranks):
        assert {k: first[k] for k in ("stats", "best", "rule")} == {k: second[k] for k in ("stats", "best", "rule")}
        assert first["max_weight_diff_across_ranks"] == 0
    rows = ranks[0]
    # every prompt scored once, the padding of the second share left out: the prompts' mean length exactly
    assert rows[0]["stats"]["eval/prompt_length_reward"] == pytest.approx((5 + 5 + 12) / 3)
    assert rows[2]["stats"]["guard/skew"] == 1 and rows[2]["stats"]["guard/rollback"] == 1
    assert rows[2]["stats"]["guard/restored_stage"] == rows[2]["best"][0] and rows[3]["rule"] == "pairs"
    # one process evaluating the best checkpoint's weights gets the score two processes recorded for it
    best_value = rows[-1]["best"][1]
    single = make_trainer(tiny_model_dir, num_branches=6, sample_batch_size=1, eval_prompts=["a cat", "a dog",
                          "a red circle"], eval_seeds=[0, 1], eval_rewards=["helpers:brightness_reward"],
                          project_kwargs={"project_dir": str(tmp_path / "single")},
                          resume_from=str(project / "checkpoints" / "checkpoint_best"))
    assert single.evaluate().metrics["eval/brightness_reward"] == pytest.approx(best_value, abs=1e-5)
