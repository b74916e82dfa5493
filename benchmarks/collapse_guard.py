"""The collapse guard on a run that collapses: `b2` on the SD toy model at study v2's settings.

In study v2 (docs/study.md) `b2` — 16 prompts × 4 branches, learning rate 1e-3, 30 stages of 64 images, history 4,
the interval growing from 14 to 20 of 20 steps over the 30 stages — collapsed on all three training seeds (held-out
alignment 0.114 / 0.120 / 0.288 at 1,920 images, from 0.865). This script trains the same runs with evaluation
during training (the 45 held-out prompts × the study's 3 evaluation seeds, scored with the exact `toy_alignment`
reward every `--eval_every` stages), `save_best=True` and the guard in each `--modes` setting, and records where
the guard fired, what it restored, the best evaluation reached, the last one, and the study's held-out evaluation
of the weights training ended with (`load_best_model_at_end=False`: what the rollback itself achieved; a rollback
after the last stage leaves the restored weights).

    python benchmarks/collapse_guard.py                                  # rollback, training seed 0
    python benchmarks/collapse_guard.py --modes rollback warn --seeds 0 1 2
    python benchmarks/collapse_guard.py --quick --out /tmp/guard.json    # a smoke run of a few seconds

Each finished run is written to `--out` (default benchmarks/results/collapse_guard.json) as it ends; a rerun skips
the (mode, seed) runs already there with the same settings. One run takes 10-15 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import toy_study  # noqa: E402
from toy_study_runs import b2_config, eval_prompts, images_per_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "collapse_guard.json"
# study v2's `b2` on the SD toy model, final held-out alignment per training seed (benchmarks/results/toy_study_v2_sd)
STUDY_FINAL = {0: 0.114, 1: 0.120, 2: 0.288}
STAGE_KEYS = ("reward_mean", "samples_kept_positive", "samples_kept_negative", "kept_advantage_sum",
              "eval/toy_alignment", "guard/skew", "guard/eval_drop", "guard/rollback", "guard/restored_stage",
              "guard/stop")


def run_settings(args) -> tuple[dict, dict, int]:
    """The study's `b2` settings (its `shared` and `b2` blocks), the study block, and the number of stages."""
    settings = toy_study.load_settings(args.quick, None, [], "sd")
    method = toy_study.resolve_method(settings, "b2")
    study = settings["study"]
    return method, study, study["budget_images"] // images_per_stage(method)


def build(method: dict, study: dict, num_stages: int, mode: str, seed: int, workdir: str, args):
    import torch

    import b2trl.toy as toy
    from b2trl import B2DiffuRLTrainer

    common.reset_accelerate_state()
    values = {k: v for k, v in copy.deepcopy(method).items() if k != "trainer"}
    values.update(
        seed=seed, num_epochs=num_stages, log_with=None, logdir=workdir, exp_name="collapse_guard", save_freq=0,
        project_kwargs={"project_dir": workdir}, eval_prompts=eval_prompts(study), eval_seeds=list(study["eval_seeds"]),
        eval_every=args.eval_every, eval_rewards=["toy_alignment"], save_best=True, on_collapse=mode,
        collapse_tolerance=args.tolerance,
    )
    config = b2_config(values)
    prompt_fn = common.seeded_prompts(toy.train_prompts(), seed)
    torch.manual_seed(seed)  # the LoRA's random init, as the study draws it
    return B2DiffuRLTrainer(config, toy.alignment_reward, prompt_fn, common.toy_pipeline("sd"))


def run_one(method: dict, study: dict, num_stages: int, mode: str, seed: int, args) -> dict:
    import b2trl.toy as toy

    workdir = tempfile.mkdtemp(prefix="collapse_guard_")
    started = time.perf_counter()
    try:
        trainer = build(method, study, num_stages, mode, seed, workdir, args)
        base = trainer.evaluate().metrics["eval/toy_alignment"]
        rows = []
        trainer.stage_end_callbacks.append(
            lambda t, stats: rows.append({"stage": stats["stage"], **{k: stats[k] for k in STAGE_KEYS if k in stats}})
        )
        trainer.train()
        config = trainer.config
        # the study's held-out evaluation of the weights training ended with (after a rollback at the last stage,
        # the restored ones; otherwise those the last evaluation during training scored)
        final = toy.evaluate_alignment(trainer.sd_pipeline, prompts=trainer.evaluator.prompts,
                                       seeds=tuple(config.eval_seeds), num_inference_steps=config.sample_num_steps,
                                       guidance_scale=config.sample_guidance_scale, eta=config.sample_eta)["overall"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_stage = images_per_stage(method)
    curve = [{"stage": -1, "images": 0, "alignment": base}] + [
        {"stage": r["stage"], "images": (r["stage"] + 1) * per_stage, "alignment": r["eval/toy_alignment"]}
        for r in rows if "eval/toy_alignment" in r
    ]
    # the run's temporary folder says nothing; the checkpoint's place in it does
    events = [dict(asdict(e), message=e.message.replace(workdir, "<project_dir>")) for e in trainer.guard.events]
    first_action = next((e["stage"] for e in events if e["action"] == "rollback"), None)
    after = [p["alignment"] for p in curve if first_action is not None and p["stage"] > first_action]
    return {
        "mode": mode, "seed": seed, "settings": method, "num_stages": num_stages, "eval_every": args.eval_every,
        "collapse_tolerance": args.tolerance, "eval_prompts": len(trainer.evaluator.prompts),
        "eval_seeds": list(config.eval_seeds), "base": base, "curve": curve, "stages": rows, "events": events,
        "best": {"stage": trainer.guard.best_stage, "alignment": trainer.guard.best_value},
        "last_evaluation": curve[-1]["alignment"], "final": final,
        "lowest_after_first_rollback": min(after) if after else None,
        "stopped": trainer.guard.stopped is not None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(records: list[dict]) -> str:
    """One row per run: the base, the best evaluation before the guard first fired and after, where it fired and
    what it restored, the last evaluation, and the study's run without the guard."""
    lines = ["| mode | training seed | base | best before the guard fired (stage) | guard fired after stage (what; "
             "restored stage) | best overall (stage) | lowest after it fired | last evaluation | final weights | "
             "study v2 `b2`, final |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["mode"], r["seed"])):
        first = r["events"][0]["stage"] if r["events"] else None
        # what the guard could restore: evaluations after a stage (the base model is no checkpoint)
        before = [p for p in r["curve"] if p["stage"] >= 0 and (first is None or p["stage"] <= first)]
        best_before = max(before, key=lambda p: p["alignment"])
        after = [p["alignment"] for p in r["curve"] if first is not None and p["stage"] > first]
        described = [
            f"{e['stage']} ({e['trigger'].replace('_', ' ').replace('+', ' + ')}"
            + (f"; {e['restored_stage']}" if e["restored_stage"] is not None else "") + ")"
            for e in r["events"]
        ]
        if len(described) > 4:  # a run that only warns fires at every evaluation once it falls
            rest = r["events"][1:]
            described = [described[0], f"{len(rest)} more, stages {rest[0]['stage']}–{rest[-1]['stage']}"]
        fired = "; ".join(described) or "–"
        lines.append(
            f"| {r['mode']} | {r['seed']} | {fmt(r['base'])} | {fmt(best_before['alignment'])} "
            f"({best_before['stage']}) | {fired} | {fmt(r['best']['alignment'])} ({r['best']['stage']}) | "
            f"{fmt(min(after) if after else None)} | {fmt(r['last_evaluation'])} | **{fmt(r['final'])}** | "
            f"{fmt(STUDY_FINAL.get(r['seed']))} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["rollback"], choices=["warn", "stop", "rollback"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval_every", type=int, default=2, help="stages between evaluations")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="collapse_tolerance: an evaluation this far below the best fires the guard")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (two runs on two cores: 1 each)")
    parser.add_argument("--quick", action="store_true", help="the toy study's CI-sized settings: a smoke run")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    if args.table:
        print(table(list(results["runs"].values())))
        return
    method, study, num_stages = run_settings(args)
    for seed in args.seeds:
        for mode in args.modes:
            key = f"{mode}_seed{seed}"
            old = results["runs"].get(key)
            if old and old["settings"] == method and old["eval_every"] == args.eval_every \
                    and old["collapse_tolerance"] == args.tolerance and old["num_stages"] == num_stages:
                print(f"{key}: done already")
                continue
            print(f"{key}: training {num_stages} stages ...", flush=True)
            results["runs"][key] = run_one(method, study, num_stages, mode, seed, args)
            results["machine"] = common.machine_description(shared_cpu=True)
            results["command"] = "python benchmarks/collapse_guard.py " + " ".join(argv or sys.argv[1:])
            common.write_json(out, results)
            print(f"{key}: final {results['runs'][key]['final']:.3f} ({results['runs'][key]['seconds']:.0f} s)")
    print(table(list(results["runs"].values())))


if __name__ == "__main__":
    main()
