"""One run of the toy study: a method's trainer on the toy model, trained for the image budget and evaluated on
held-out prompts as it goes. `toy_study.py` resolves each method's settings and calls `run_one` per (method,
seed)."""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone

import common
import toy_study_report as report

from b2trl.timing import PhaseTimer

# the per-stage statistics of B²-DiffuRL's trainer that a run record keeps
B2_STAGE_KEYS = ("interval_length", "branch_point", "interval_end", "groups_kept", "groups_total", "samples_kept",
                 "samples_kept_positive", "samples_kept_negative", "skipped_update", "loss", "approx_kl", "clipfrac",
                 "pairs_kept", "dpo_margin", "dpo_accuracy", "kl_ref")


def images_per_stage(resolved: dict) -> int:
    per_stage = resolved["sample_batch_size"] * resolved["sample_num_batches_per_epoch"]
    return per_stage * (resolved.get("num_branches", 1) if resolved["trainer"] == "b2" else 1)


def eval_prompts(study: dict) -> list[str]:
    from b2trl.toy import heldout_prompts

    prompts = heldout_prompts()
    n = study["eval_num_prompts"]
    if n is None or n >= len(prompts):
        return prompts
    stride = len(prompts) // n  # spread over the list, which is ordered by template
    return prompts[::stride][:n]


def b2_config(values: dict):
    from b2trl import B2DiffuRLConfig, IntervalSchedule

    schedule = IntervalSchedule(**values.pop("interval_schedule", {}))
    return B2DiffuRLConfig(**values, interval_schedule=schedule)


class DDPOStageStats:
    """
    The per-stage figures that B²-DiffuRL's trainer reports in `last_stage_stats` (``time/<phase>`` seconds and
    ``reward_mean``), collected around TRL's `DDPOTrainer`, which reports neither: its phases are timed from
    outside and its rewards recorded as the reward function returns them.
    """

    def __init__(self, reward_fn):
        self.timer, self.rewards, self._reward_fn = PhaseTimer(), [], reward_fn

    def reward_fn(self, images, prompts, metadata=None):
        rewards, info = self._reward_fn(images, prompts, metadata)
        self.rewards.extend(float(x) for x in rewards.detach().float().reshape(-1).cpu())
        return rewards, info

    def pop(self) -> dict:
        """The figures of the stage that just ended; the next stage starts from zero."""
        stats = {**self.timer.stats(), "reward_mean": sum(self.rewards) / max(len(self.rewards), 1)}
        self.timer.seconds.clear()  # the same timer stays wrapped around the trainer's phases
        self.rewards = []
        return stats


def build_trainer(method_settings: dict, seed: int, num_stages: int, workdir: str, model: str = "sd"):
    """
    A fresh pipeline (LoRA) and trainer for one run, and for DDPO the collector of its stage figures (`None` for
    B²-DiffuRL, whose trainer reports them). Nothing is written under `workdir` (no checkpoints).
    """
    import torch

    import b2trl.toy as toy

    common.reset_accelerate_state()
    values = {k: v for k, v in copy.deepcopy(method_settings).items() if k != "trainer"}
    run_fields = dict(seed=seed, num_epochs=num_stages, log_with=None, logdir=workdir, exp_name="toy_study",
                      project_kwargs={"project_dir": workdir})
    prompt_fn = common.seeded_prompts(toy.train_prompts(), seed)
    torch.manual_seed(seed)  # the LoRA's random init
    pipeline = common.toy_pipeline(model)
    if method_settings["trainer"] == "b2":
        from b2trl import B2DiffuRLTrainer

        config = b2_config({**values, **run_fields, "save_freq": 0})
        return B2DiffuRLTrainer(config, toy.alignment_reward, prompt_fn, pipeline), None
    from trl import DDPOConfig

    # save_freq beyond the last stage: TRL saves at every epoch divisible by it, and a study run is
    # restarted from scratch rather than resumed (TRL's LoRA resume trains a fresh adapter, not the saved one)
    config = DDPOConfig(**values, **run_fields, save_freq=10**9)
    stats = DDPOStageStats(toy.alignment_reward)
    trainer = common.quiet_ddpo_trainer(config, stats.reward_fn, prompt_fn, pipeline)
    common.run_in_phases(trainer, stats.timer)
    return trainer, stats


def lora_state(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.sd_pipeline.denoiser.named_parameters() if "lora" in n}


def evaluate(trainer, prompts, study, method_settings) -> dict:
    import b2trl.toy as toy

    trainer.sd_pipeline.denoiser.eval()
    result = toy.evaluate_alignment(
        trainer.sd_pipeline,
        prompts=prompts,
        seeds=tuple(study["eval_seeds"]),
        num_inference_steps=method_settings["sample_num_steps"],
        guidance_scale=method_settings["sample_guidance_scale"],
        eta=method_settings["sample_eta"],
    )
    keep = ("overall", "per_seed", "per_template", "per_attribute", "extra_objects", "diversity", "num_images",
            "per_prompt", "seconds")
    return {k: result[k] for k in keep}


def run_one(method: str, seed: int, method_settings: dict, study: dict, paths: dict, meta: dict, log) -> dict:
    """Train one (method, seed) for the budget, evaluating as it goes; returns the run record."""
    per_stage = images_per_stage(method_settings)
    num_stages = study["budget_images"] // per_stage
    prompts = eval_prompts(study)
    trainer, ddpo_stats = build_trainer(method_settings, seed, num_stages, paths["work"], study.get("model", "sd"))
    start_lora = lora_state(trainer)
    record = {
        "method": method, "seed": seed, "status": "running", "fingerprint": meta["fingerprint"],
        "settings": method_settings, "study": study, "images_per_stage": per_stage, "num_stages": num_stages,
        "eval_prompts": prompts, "curve": [], "stages": [], **{k: v for k, v in meta.items() if k != "fingerprint"},
    }
    train_seconds = eval_seconds = sample_seconds = reward_seconds = 0.0
    started = time.perf_counter()

    def evaluate_point(images: int, stage: int):
        nonlocal eval_seconds
        t0 = time.perf_counter()
        point = evaluate(trainer, prompts, study, method_settings)
        eval_seconds += time.perf_counter() - t0
        point.update(images=images, stages=stage, train_seconds=round(train_seconds, 3))
        if images < study["budget_images"]:
            point.pop("per_prompt")
        record["curve"].append(point)
        report.write_json(paths["partial"], record)
        log(f"{method} seed {seed}: {images:>5} images, held-out alignment {point['overall']:.3f} "
            f"(train {train_seconds:.0f} s)")

    evaluate_point(0, 0)
    global_step = 0
    for stage in range(num_stages):
        t0 = time.perf_counter()
        new_step = trainer.step(stage, global_step)
        seconds = time.perf_counter() - t0
        stats = trainer.last_stage_stats if ddpo_stats is None else ddpo_stats.pop()
        train_seconds += seconds
        sample_seconds += stats["time/sampling"]
        reward_seconds += stats["time/rewards"]
        images = (stage + 1) * per_stage
        row = {
            "stage": stage, "images": images, "seconds": round(seconds, 3),
            "sample_seconds": round(stats["time/sampling"], 3),
            "reward_seconds": round(stats["time/rewards"], 3),
            "reward_mean": stats["reward_mean"],
            "optimizer_steps": new_step - global_step,
        }
        row.update({k: stats[k] for k in B2_STAGE_KEYS if k in stats})
        record["stages"].append(row)
        global_step = new_step
        if images % study["eval_every_images"] == 0 or images == study["budget_images"]:
            evaluate_point(images, stage + 1)

    end_lora = lora_state(trainer)
    record.update(
        status="done",
        final=record["curve"][-1],
        lora_max_change=max(float((end_lora[n] - start_lora[n]).abs().max()) for n in start_lora),
        wall={
            "train_seconds": round(train_seconds, 2),
            "sample_seconds": round(sample_seconds, 2),
            "reward_seconds": round(reward_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return record
