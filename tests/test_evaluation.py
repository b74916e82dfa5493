"""Evaluation during training: fixed noise, several rewards, EMA weights, and the best checkpoint."""

import json

import numpy as np
import pytest
import torch

from b2trl import B2DiffuRLConfig
from b2trl import checkpoint as ckpt
from b2trl.images import generate_images
from eval_helpers import scripted_eval_reward
from helpers import lora_params, make_trainer, max_change

EVAL_PROMPTS = ["a cat", "a dog", "a red circle"]


def darkness(images, prompts, prompt_metadata):
    return 1 - images.float().mean(dim=(1, 2, 3)), {}


def _trainer(model_dir, tmp_path, **overrides):
    values = dict(eval_prompts=EVAL_PROMPTS, eval_seeds=[0, 1], project_kwargs={"project_dir": str(tmp_path)})
    values.update(overrides)
    return make_trainer(model_dir, **values)


def test_an_evaluation_is_the_fixed_noise_samples_scored_by_each_reward(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, eval_rewards=["reward", "test_evaluation:darkness"])
    first, second = trainer.evaluate(), trainer.evaluate()
    assert list(first.metrics) == ["eval/reward", "eval/darkness"]
    assert first.metrics == second.metrics  # unchanged weights, the same noise: the same scores
    config = trainer.config
    images = generate_images(trainer.sd_pipeline, EVAL_PROMPTS, [0, 1], num_inference_steps=config.sample_num_steps,
                             eta=config.sample_eta, guidance_scale=config.sample_guidance_scale)
    brightness = images.float().mean(dim=(2, 3, 4)).T.numpy()  # (prompts, seeds): the training reward by hand
    np.testing.assert_array_equal(first.scores["eval/reward"], brightness.astype(np.float64))
    np.testing.assert_allclose(first.scores["eval/darkness"], 1 - brightness, atol=1e-6)
    assert first.metrics["eval/reward"] == pytest.approx(float(brightness.astype(np.float64).mean()))
    width, height = first.grid.size
    assert width > 2 * 32 and height > 3 * 32  # two seeds per row, three prompts


def test_a_share_of_the_prompts_gets_the_noise_of_its_position(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    evaluator = trainer.evaluator
    # what two processes sample: two prompts each, the second share padded with the last prompt
    assert evaluator._share(0, 2) == (0, 2, ["a cat", "a dog"])
    assert evaluator._share(1, 2) == (2, 1, ["a red circle", "a red circle"])
    assert evaluator._share(3, 4) == (3, 0, ["a red circle"])
    whole = evaluator.sample(trainer, EVAL_PROMPTS, 0)
    share = evaluator.sample(trainer, EVAL_PROMPTS[1:], 1)
    torch.testing.assert_close(share, whole[:, 1:], atol=1e-5, rtol=0)
    assert (whole[:, 0] - whole[:, 1]).abs().max() > 0.01  # another position, other noise


def test_an_evaluation_a_prompt_at_a_time_scores_the_same(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    whole = trainer.evaluate()
    trainer.config.rollout_chunk_size = 1  # one prompt per pipeline call: three calls per seed
    assert trainer.evaluator.prompts_per_call == 1
    chunked = trainer.evaluate()
    np.testing.assert_allclose(chunked.scores["eval/reward"], whole.scores["eval/reward"], atol=1e-5)
    assert chunked.grid.size == whole.grid.size  # every prompt is still in the grid


def test_training_logs_the_evaluation_every_few_stages_and_after_the_last(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, num_epochs=3, eval_every=2, train_learning_rate=1e-2)
    rows = []
    trainer.stage_end_callbacks.append(lambda t, stats: rows.append(dict(stats)))
    trainer.train()
    assert ["eval/reward" in row for row in rows] == [False, True, True]
    assert rows[1]["time/evaluation"] > 0
    again = trainer.evaluate()  # the weights after the last stage, evaluated again
    assert again.metrics["eval/reward"] == rows[2]["eval/reward"]
    records = [json.loads(line) for line in (tmp_path / "evaluation" / "evaluations.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 2]
    assert set(records[0]["per_prompt"]["eval/reward"]) == set(EVAL_PROMPTS)
    assert sorted(p.name for p in (tmp_path / "evaluation").glob("*.png")) == ["stage_0001.png", "stage_0002.png"]


def test_with_ema_the_evaluation_samples_the_average(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, ema_decay=0.5, train_learning_rate=5e-2)
    trainer.step(0, 0)
    raw = {n: p.detach().clone() for n, p in trainer.sd_pipeline.unet.named_parameters() if "lora" in n}
    result = trainer.evaluate()
    with trainer.ema.applied():
        averaged = trainer.evaluator.sample(trainer, EVAL_PROMPTS, 0)
    config = trainer.config
    trained = generate_images(trainer.sd_pipeline, EVAL_PROMPTS, [0, 1], num_inference_steps=config.sample_num_steps,
                              eta=config.sample_eta, guidance_scale=config.sample_guidance_scale)
    expected = averaged.float().mean(dim=(2, 3, 4)).T.double().numpy()
    np.testing.assert_allclose(result.scores["eval/reward"], expected, atol=1e-6)
    assert np.abs(trained.float().mean(dim=(2, 3, 4)).T.double().numpy() - expected).max() > 1e-4
    assert max_change(raw, lora_params(trainer.sd_pipeline)) == 0  # the trained weights are back afterwards


def test_save_best_keeps_the_best_stage_and_load_best_restores_it(tiny_model_dir, tmp_path):
    # values exact in float32; the second evaluation (after stage 1) is the best
    scripted_eval_reward([0.25, 0.875, 0.5, 0.375])
    trainer = _trainer(tiny_model_dir, tmp_path, num_epochs=4, eval_every=1, eval_seeds=[0], eval_rewards=["scripted"],
                       save_best=True, load_best_model_at_end=True, train_learning_rate=1e-2)
    weights = {}
    trainer.stage_end_callbacks.append(lambda t, stats: weights.update({stats["stage"]: lora_params(t.sd_pipeline)}))
    trainer.train()
    assert max_change(weights[1], weights[3]) > 0  # training went on after the best stage
    assert max_change(weights[1], lora_params(trainer.sd_pipeline)) == 0  # and the best weights came back
    state = ckpt.read_state(trainer.best_checkpoint_dir)
    assert state["stage"] == 1 and state["best"]["metric"] == "eval/scripted" and state["best"]["value"] == 0.875
    assert (trainer.guard.best_stage, trainer.guard.best_value) == (1, 0.875)
    assert ckpt.resolve_resume_path("best", trainer.checkpoint_dir) == trainer.best_checkpoint_dir
    # the best checkpoint is a complete one: a run resumed from it continues after its stage, knowing its best
    resumed = _trainer(tiny_model_dir, tmp_path, num_epochs=4, eval_every=1, eval_seeds=[0], eval_rewards=["scripted"],
                       save_best=True, resume_from="best")
    assert resumed.first_epoch == 2 and resumed.guard.best_value == 0.875
    log = (tmp_path / "evaluation" / "evaluations.jsonl").read_text().splitlines()
    assert [json.loads(line)["stage"] for line in log] == [0, 1]  # stages 2 and 3 are evaluated again
    assert max_change(weights[1], lora_params(resumed.sd_pipeline)) == 0


def test_a_fresh_run_refuses_a_folder_holding_another_runs_best_checkpoint(tiny_model_dir, tmp_path):
    (tmp_path / "checkpoints" / "checkpoint_best").mkdir(parents=True)
    ckpt.write_state(str(tmp_path / "checkpoints" / "checkpoint_best"), {"stage": 0})
    with pytest.raises(ValueError, match="best checkpoint of another run"):
        _trainer(tiny_model_dir, tmp_path, eval_every=1, save_best=True)


def test_evaluation_prompts_from_a_file_and_bad_sources_name_the_field(tiny_model_dir, tmp_path):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a cat\n\na dog\n")
    trainer = _trainer(tiny_model_dir, tmp_path, eval_prompts=None, eval_prompts_file=str(prompts))
    assert trainer.evaluator.prompts == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="eval_prompts_file: .*missing.txt: no such file"):
        _trainer(tiny_model_dir, tmp_path, eval_prompts=None, eval_prompts_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="eval_rewards: unknown reward 'no_such_reward'"):
        _trainer(tiny_model_dir, tmp_path, eval_rewards=["no_such_reward"])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(eval_every=2), "eval_every=2 needs evaluation prompts"),
        (dict(eval_prompts=["a"], eval_prompts_file="p.txt"), "one way, not 2: eval_prompts, eval_prompts_file"),
        (dict(eval_prompts=["a"], eval_seeds=[]), "eval_seeds must be a non-empty list"),
        (dict(eval_prompts=["a"], eval_seeds=[0, 0]), "eval_seeds has repeated seeds"),
        (dict(eval_prompts=["a"], save_best=True), "save_best=True keeps the best evaluated checkpoint: set eval_"),
        (dict(load_best_model_at_end=True), "load_best_model_at_end=True restores the best checkpoint: set save_best"),
        (dict(eval_prompts=["a"], eval_every=1, eval_rewards=["clip_score"], metric_for_best_model="eval/reward"),
         r"metric_for_best_model='eval/reward' is not an evaluation metric; use one of \['eval/clip_score'\]"),
        (dict(eval_rewards=["a.b:score", "c:score"]), r"logs \['eval/score'\] more than once"),
    ],
)
def test_evaluation_settings_are_checked_with_the_field_and_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        B2DiffuRLConfig(**fields)


def test_metric_names_follow_the_reward_names():
    from b2trl.evaluation_config import best_metric_name

    config = B2DiffuRLConfig(eval_prompts=["a"], eval_every=1, metric_for_best_model="jpeg_compressibility",
                             eval_rewards=["pkg.mod:aesthetic_fn", "jpeg_compressibility"])
    assert best_metric_name(config) == "eval/jpeg_compressibility"
    assert best_metric_name(B2DiffuRLConfig(eval_rewards=["pkg.mod:aesthetic_fn"])) == "eval/aesthetic_fn"
    assert best_metric_name(B2DiffuRLConfig()) == "eval/reward"
