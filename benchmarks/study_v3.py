"""Study v3: which method wins at equal compute, on both toy models.

Study v2 (`toy_study.py`, docs/study.md) gave every method the same number of *images*. Here every run gets the
same **compute**: it trains until the trainer's own counter, `compute/denoiser_rows` (denoiser rows of sampling,
reference passes and training, a training row counted as `b2trl.compute.TRAINING_ROW_COST` forward rows), reaches
the budget. The budget is the compute of study v2's DDPO run (1,920 images, every one of 20 steps sampled and
trained twice with guidance), counted the same way. Held-out prompts are scored at four equally spaced compute
points (and at 0), and also at 640, 1,280 and 1,920 images when a run gets there, for the comparison at equal
images. Every method is one of b2trl's named presets (`B2DiffuRLConfig.for_method`) with the toy scale's shared
settings on top; what a method sets itself (clip range, inner epochs, KL, EMA) it keeps.

Tasks: `alignment` (the toy world's alignment reward, held-out prompts of every template, both toy models) and
`relation` (the relation attribute alone — is the first object on the named side of the second — on relation
prompts, the SD toy model: sparse, binary and decided in the first denoising steps).

    python benchmarks/study_v3.py --task alignment --model sd                # every SD method, seeds 0 1 2
    python benchmarks/study_v3.py --task alignment --model sd3 --seeds 0     # the flow model, one seed
    python benchmarks/study_v3.py --task relation --methods b2_pairs b2_start_pairs --seeds 0
    python benchmarks/study_v3.py --report                                   # rebuild docs/study_v3.md only

Runs are written to benchmarks/results/study_v3/<task>_<model>/runs/<method>_seed<k>.json (each evaluation also
to a `.partial.json` as it goes); a finished run with the same settings is skipped, so the study resumes where it
stopped (an interrupted run starts again). A run being trained holds a `.lock` file: two processes with
`--threads 1` share a study on two cores. The page, docs/study_v3.md, is written by `study_v3_report.py`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from toy_study import claim_run, code_version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "study_v3"

STUDY = {
    # study v2's DDPO run, counted: 1,920 images x 20 steps x 2 (guidance) sampled, and the same rows trained twice
    # (two inner epochs) at TRAINING_ROW_COST forward rows each; see budget_rows()
    "budget_images_ddpo_v2": 1920,
    "eval_points": 4,  # held-out evaluations at k/4 of the budget (and at 0)
    "image_points": [640, 1280, 1920],  # also at these image counts, for the equal-image comparison
    "seeds": [0, 1, 2],
    "eval_seeds": [0, 1, 2],
}
# the toy scale, shared by every method (v2's shared block); per model, the learning rate of v2
SHARED = {
    "sample_num_steps": 20, "sample_eta": 1.0, "sample_guidance_scale": 5.0, "sample_num_batches_per_epoch": 1,
    "train_batch_size": 8,
    "train_gradient_accumulation_steps": 1, "train_max_grad_norm": 1.0, "train_adv_clip_max": 5.0,
    "history_stages": 4, "mixed_precision": "no",
}
MODEL_SETTINGS = {"sd": {"train_learning_rate": 1e-3}, "sd3": {"train_learning_rate": 3e-4, "noise_level": 0.7}}
GROUPS = {"sample_batch_size": 16, "num_branches": 4}  # 64 images a stage, as in v2
# each study method: a preset and what the study sets on top (the toy scale)
METHODS = {
    "b2": ("b2", GROUPS),
    "b2_pairs": ("b2_pairs", GROUPS),
    "b2_grpo": ("b2_grpo", GROUPS),
    "b2_no_branching": ("b2", {"sample_batch_size": 64, "num_branches": 1, "selection_rule": "all"}),
    "b2_ema": ("b2", {**GROUPS, "ema_decay": 0.9, "ema_update_every": 8}),
    "d3po": ("d3po", {"sample_batch_size": 32}),
    "ddpo": ("ddpo", {"sample_batch_size": 64}),
    "flow_grpo": ("flow_grpo", GROUPS),
    "flow_grpo_fast": ("flow_grpo_fast", GROUPS),
    "mix_grpo": ("mix_grpo", GROUPS),
    # windows for the relation task, with the zero-sum rule
    "b2_start_pairs": ("b2_pairs", {**GROUPS, "interval_schedule": {"anchor": "start"}}),
    "b2_sliding_pairs": ("b2_pairs", {**GROUPS, "interval_schedule": {"anchor": "sliding", "initial_length": 4,
                                                                       "shift_every": 4, "window_max_start": 8}}),
    "b2_random_pairs": ("b2_pairs", {**GROUPS, "interval_schedule": {"anchor": "random", "initial_length": 4,
                                                                      "window_max_start": 8}}),
}
TASKS = {
    "alignment": {
        "sd": ["b2", "b2_pairs", "b2_grpo", "b2_no_branching", "d3po", "ddpo", "b2_ema"],
        "sd3": ["b2", "b2_pairs", "b2_grpo", "b2_no_branching", "d3po", "flow_grpo", "flow_grpo_fast", "mix_grpo"],
    },
    "relation": {"sd": ["b2_pairs", "b2_start_pairs", "b2_random_pairs", "b2", "b2_grpo", "b2_no_branching", "ddpo",
                        "b2_sliding_pairs"]},
}


def budget_rows(settings: dict) -> float:
    """The compute of study v2's DDPO run: every image through every step with guidance, sampled once and trained in
    two inner epochs."""
    from b2trl.compute import TRAINING_ROW_COST

    rows = STUDY["budget_images_ddpo_v2"] * settings["sample_num_steps"] * 2
    return rows + 2 * rows * TRAINING_ROW_COST


def method_settings(method: str, model: str) -> dict:
    preset, extra = METHODS[method]
    return {"preset": preset, **SHARED, **MODEL_SETTINGS[model], **copy.deepcopy(extra)}


def build_config(settings: dict, seed: int, num_stages: int, workdir: str):
    from b2trl import B2DiffuRLConfig

    values = {k: v for k, v in settings.items() if k != "preset"}
    run = dict(seed=seed, num_epochs=num_stages, log_with=None, logdir=workdir, exp_name="study_v3", save_freq=0,
               project_kwargs={"project_dir": workdir})
    return B2DiffuRLConfig.for_method(settings["preset"], **values, **run)


# ------------------------------------------------------------------------------------------------ the tasks


def relation_reward(images, prompts, prompt_metadata=None):
    """The relation attribute alone: 1 when the first object is on the named side of the second, else 0 (NaN for
    a prompt without a relation, which the relation task never draws)."""
    import torch

    from b2trl.toy.reward import score_attributes

    attrs = score_attributes(images, list(prompts))[0]
    return attrs[:, 4].to(torch.float32), {}


def task_data(task: str):
    """(reward, training prompts, held-out prompts) of a task."""
    import b2trl.toy as toy

    if task == "alignment":
        return toy.alignment_reward, toy.train_prompts(), toy.heldout_prompts()
    relation = [p for p in toy.train_prompts() if toy.parse_prompt(p).template == "relation"]
    held_out = [p for p in toy.heldout_prompts() if toy.parse_prompt(p).template == "relation"]
    return relation_reward, relation, held_out


def evaluate(trainer, prompts, settings, seeds) -> dict:
    """Held-out alignment with fixed noise, through the EMA weights when the run keeps them."""
    import contextlib

    import b2trl.toy as toy

    trainer.denoiser.eval()
    with trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext():
        result = toy.evaluate_alignment(trainer.sd_pipeline, prompts=prompts, seeds=tuple(seeds),
                                        num_inference_steps=settings["sample_num_steps"],
                                        guidance_scale=settings["sample_guidance_scale"], eta=settings["sample_eta"])
    keep = ("overall", "per_seed", "per_template", "per_attribute", "extra_objects", "diversity", "num_images")
    return {k: result[k] for k in keep}


# ------------------------------------------------------------------------------------------------ one run


def run_one(task: str, model: str, method: str, seed: int, paths: dict, meta: dict, log, quick: bool = False) -> dict:
    """Train one (method, seed) until the compute budget, evaluating at the compute and image points. `quick`: a
    smoke run (1/200 of the budget, 4 held-out prompts, one noise seed)."""
    import torch

    from b2trl import B2DiffuRLTrainer

    settings = method_settings(method, model)
    budget = budget_rows(settings) / (200 if quick else 1)
    points = [budget * k / STUDY["eval_points"] for k in range(1, STUDY["eval_points"] + 1)]
    reward, train_prompts, held_out = task_data(task)
    eval_seeds = STUDY["eval_seeds"][:1] if quick else STUDY["eval_seeds"]
    held_out = held_out[:: max(1, len(held_out) // 4)][:4] if quick else held_out
    common.reset_accelerate_state()
    torch.manual_seed(seed)  # the LoRA's random init
    pipeline = common.toy_pipeline(model)
    # the schedule's stage count is the paper's (100); a run stops at the budget, whatever its stage
    trainer = B2DiffuRLTrainer(build_config(settings, seed, 10**6, paths["work"]), reward,
                               common.seeded_prompts(train_prompts, seed), pipeline)
    record = {"task": task, "model": model, "method": method, "seed": seed, "status": "running",
              "settings": settings, "budget_rows": budget, "eval_prompts": held_out, "curve": [], "stages": [],
              **meta}
    started = time.perf_counter()

    def evaluate_point(label: str, images: int, stage: int):
        t0 = time.perf_counter()
        point = evaluate(trainer, held_out, settings, eval_seeds)
        point.update(label=label, images=images, stages=stage, compute_rows=trainer.compute.forward_rows,
                     compute_seconds=round(trainer.compute.seconds, 2), eval_seconds=round(time.perf_counter() - t0, 1))
        record["curve"].append(point)
        common.write_json(paths["partial"], record)
        log(f"{method} seed {seed} [{label}]: {images} images, {point['compute_rows'] / 1e3:.0f}k rows, held-out "
            f"{point['overall']:.3f} (relation {point['per_attribute'].get('relation', float('nan')):.3f})")

    evaluate_point("start", 0, 0)
    images, global_step, stage, next_point = 0, 0, 0, 0
    while next_point < len(points):
        global_step = trainer.step(stage, global_step)
        stats = trainer.last_stage_stats
        images += stats["samples_total"]
        stage += 1
        record["stages"].append({k: stats.get(k) for k in (
            "stage", "reward_mean", "reward_std", "branch_point", "interval_end", "samples_kept",
            "samples_kept_positive", "samples_kept_negative", "kept_advantage_sum", "skipped_update",
            "optimizer_steps", "kl_ref", "compute/denoiser_rows", "compute/seconds")})
        if images in STUDY["image_points"]:
            evaluate_point(f"{images} images", images, stage)
        while next_point < len(points) and trainer.compute.forward_rows >= points[next_point]:
            next_point += 1
            evaluate_point(f"compute {next_point}/{len(points)}", images, stage)
    record.update(status="done", final=record["curve"][-1], images=images, stages_trained=stage,
                  wall_seconds=round(time.perf_counter() - started, 1),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return record


# ------------------------------------------------------------------------------------------------ driver


def fingerprint(task: str, model: str, method: str, seed: int) -> str:
    from b2trl.compute import TRAINING_ROW_COST

    text = json.dumps({"task": task, "model": model, "settings": method_settings(method, model), "seed": seed,
                       "study": STUDY, "row_cost": TRAINING_ROW_COST}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="alignment", choices=sorted(TASKS))
    p.add_argument("--model", default="sd", choices=["sd", "sd3"])
    p.add_argument("--methods", nargs="+", default=None, help="default: every method of the task and model")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1/200 of the budget, into --output_dir")
    p.add_argument("--output_dir", default=None, help="where the runs go (default benchmarks/results/study_v3)")
    p.add_argument("--report", action="store_true", help="only rebuild docs/study_v3.md from the finished runs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.report:
        import torch

        if args.model not in TASKS[args.task]:
            raise SystemExit(f"error: the {args.task} task runs on {', '.join(TASKS[args.task])}")
        methods = args.methods or TASKS[args.task][args.model]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"error: unknown methods {unknown}; known: {', '.join(METHODS)}")
        if args.quick and not args.output_dir:
            raise SystemExit("error: --quick writes into --output_dir, never into the study's results")
        torch.set_num_threads(args.threads)
        os.environ.setdefault("TQDM_DISABLE", "1")
        out = Path(args.output_dir or RESULTS) / f"{args.task}_{args.model}"
        runs = out / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        meta = {"machine": common.machine_description(shared_cpu=True), "code": code_version()}

        def log(message):
            print(f"[study_v3] {message}", flush=True)

        for seed in args.seeds or STUDY["seeds"]:
            for method in methods:
                name = f"{method}_seed{seed}"
                key = fingerprint(args.task, args.model, method, seed) + ("-quick" if args.quick else "")
                final, lock = runs / f"{name}.json", runs / f"{name}.lock"
                holder = claim_run(lock)
                if holder is not None:
                    log(f"skip {name}: {holder} is training it")
                    continue
                try:
                    if final.exists() and json.loads(final.read_text()).get("fingerprint") == key:
                        log(f"skip {name}: finished")
                        continue
                    paths = {"partial": runs / f"{name}.partial.json", "work": str(out / "work" / name)}
                    record = run_one(args.task, args.model, method, seed, paths, {**meta, "fingerprint": key}, log,
                                     quick=args.quick)
                    common.write_json(final, record)
                    paths["partial"].unlink(missing_ok=True)
                    gc.collect()
                    log(f"done {name}: held-out {record['final']['overall']:.3f} after {record['images']} images, "
                        f"{record['wall_seconds']:.0f} s")
                finally:
                    lock.unlink(missing_ok=True)
    import study_v3_report

    results = Path(args.output_dir or RESULTS)
    page = results / "study_v3.md" if args.quick or args.output_dir else REPO / "docs" / "study_v3.md"
    print(study_v3_report.write_report(results, page, order=list(METHODS)))


if __name__ == "__main__":
    main()
