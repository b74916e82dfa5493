"""Two processes on CPU (gloo), launched with torchrun, each with its own kept-sample count."""

from helpers import torchrun_tiny as _torchrun


def test_two_processes_stay_identical_with_different_kept_counts(tiny_model_dir, tmp_path):
    stages = _torchrun(tiny_model_dir, tmp_path, "--epochs", "3")
    assert [s["stage"] for s in stages] == [0, 1, 2]
    for s in stages:
        assert s["max_weight_diff_across_ranks"] == 0.0
        assert s["kept_per_rank"][1] == 0 < s["kept_per_rank"][0]  # rank 1's rewards are flat
        assert s["samples_total"] == 2 * 2 * 2 * 3  # both processes' rewards were gathered
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"]  # and the shared weights trained


def test_two_processes_with_uneven_pair_counts_stay_identical_under_the_dpo_loss(tiny_model_dir, tmp_path):
    stages = _torchrun(tiny_model_dir, tmp_path, "--epochs", "3", "--loss-type", "dpo")
    assert [s["stage"] for s in stages] == [0, 1, 2]
    for s in stages:
        assert s["max_weight_diff_across_ranks"] == 0.0
        assert s["kept_per_rank"][1] == 0  # rank 1's rewards are flat: it has no pair and runs padding pairs
        assert s["pairs_kept"] == s["kept_per_rank"][0] // 2
    trained = [s for s in stages if s["skipped_update"] == 0]
    assert trained and all("dpo_margin" in s and s["optimizer_steps"] > 0 for s in trained)
    assert stages[-1]["weight_norm"] != stages[0]["weight_norm"] or trained == stages[-1:]


def test_plain_ddpo_lets_the_processes_drift_apart(tiny_model_dir, tmp_path):
    (control,) = _torchrun(tiny_model_dir, tmp_path, "--epochs", "2", "--plain-ddpo")
    assert control["max_weight_diff_across_ranks"] > 1e-4


def test_two_processes_compute_the_grpo_formula_on_the_gathered_rewards(tiny_model_dir, tmp_path):
    import numpy as np

    stages = _torchrun(tiny_model_dir, tmp_path, "--epochs", "1", "--selection-rule", "grpo",
                       "--advantage-std", "global", "--ema-decay", "0.5")
    (stage,) = stages
    rewards, prompts = np.array(stage["rewards"]), np.array(stage["prompts"], dtype=object)
    assert len(rewards) == 2 * 2 * 2 * 3 and set(prompts[:12]) == {"a cat", "a dog"}  # rank 0's rows first
    spread = rewards.std()  # global std: every process's rewards
    expected = np.zeros_like(rewards)
    for prompt in set(prompts):
        rows = prompts == prompt
        expected[rows] = (rewards[rows] - rewards[rows].mean()) / (spread + 1e-4)
    expected = np.clip(expected, -5, 5)
    np.testing.assert_allclose(np.concatenate(stage["advantages_by_rank"]), expected, rtol=1e-10, atol=1e-12)
    assert stage["kept_per_rank"][1] == 0 < stage["kept_per_rank"][0]  # rank 1's flat rewards tie
    assert stage["max_weight_diff_across_ranks"] == 0.0 and stage["max_ema_diff_across_ranks"] == 0.0
