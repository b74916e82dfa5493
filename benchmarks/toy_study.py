"""Sample efficiency on the toy world: B²-DiffuRL, two ablations and plain TRL DDPO at an equal image budget.

Every (method, seed) run samples the same number of images and evaluates held-out alignment
(`b2trl.toy.evaluate_alignment` on `toy.heldout_prompts()`, fixed evaluation seeds) before training and every
`eval_every_images` sampled images. Methods:

- `b2`: B²-DiffuRL (`B2DiffuRLTrainer`), 16 prompts × 4 branches per stage;
- `ddpo`: plain `trl.DDPOTrainer` (trl 0.23.1) with per-prompt stat tracking and every timestep trained;
- `b2_no_schedule`: B² training the whole trajectory from stage 0 (no backward progressive schedule);
- `b2_no_branching`: B² with one branch per prompt (no groups), every sample trained with its per-prompt z-score.
- `b2_start`: B² with the interval anchored at the start (`IntervalSchedule(anchor="start")`): the first steps are
  trained and grow forwards, branches fork at the initial noise, the remaining steps finish each branch untrained.
- `b2_start_pairs`: `b2_start` with `selection_rule="pairs"`.
- `b2_n2`: B² with 32 prompts × 2 branches per stage instead of 16 × 4 (the preset of `b2trl toy`).
- `b2_all`: B² without selection (every branch trained with its per-prompt z-score; branching kept).
- `b2_pairs`: B² with `selection_rule="pairs"` (best and worst branch of a group together, zero-sum advantages).
- `b2_dpo`: B² with the DPO-style loss (`loss_type="dpo"`): each kept group's best and worst branch as a pair.
- `d3po`: the D3PO baseline with this trainer: pairs of trajectories sharing only the initial noise (branch point
  0, the whole trajectory trained, no schedule), the DPO loss, every pair whose rewards differ.

All settings are in `SETTINGS` at the top of this script; `--set BLOCK.KEY=VALUE` (repeatable) and
`--settings_json` override them:

    python benchmarks/toy_study.py                                  # the study: every method x 3 seeds, docs/study.md
    python benchmarks/toy_study.py --model sd3                      # on the flow toy model: docs/study_flow.md
    python benchmarks/toy_study.py --set b2.train_learning_rate=3e-4 --set b2.num_branches=8 --output_dir outputs/lr
    python benchmarks/toy_study.py --settings_json '{"shared": {"train_num_inner_epochs": 1}}'
    python benchmarks/toy_study.py --show_settings                  # print the resolved settings and exit
    python benchmarks/toy_study.py --report                         # only rebuild docs/study.md and its plots
    python benchmarks/toy_study.py --quick --output_dir outputs/quick  # CI-sized smoke run, report there too

A run with changed settings (`--set`, `--settings_json`, `--budget_images`, `--eval_every_images`) writes its
report next to its runs, not into docs/, unless `--report_dir` says otherwise: the docs show the study as defined.
Give such an experiment its own `--output_dir`: in the study's, its runs would replace the study's runs of the same
method and seed (kept as `.json.stale`).

This file holds the settings and the driver; one (method, seed) run is `toy_study_runs.run_one`, the page is
written by `toy_study_report.py`.

Each finished run is written to `<output_dir>/runs/<method>_seed<k>.json` (its curve also to
`<method>_seed<k>.partial.json` as it goes). A rerun skips finished runs whose settings are unchanged; a run
whose settings changed is trained again (the old file is kept as `.json.stale`). An interrupted run starts
again from its beginning: runs write no checkpoints. A run being trained holds `<method>_seed<k>.lock`, so several
processes can share one output directory: on two cores, two processes with `--threads 1` and different `--methods`
or `--seeds` train twice as fast as one, and a process that reaches a run another one is training skips it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import gc
import hashlib
import json
import os
import shlex
import socket
import sys
from pathlib import Path

# the sibling modules import as top-level ones, whether this file runs as a script or is loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import toy_study_report as report  # noqa: E402
from toy_study_runs import b2_config, images_per_stage, run_one  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("b2", "b2_n2", "b2_pairs", "b2_all", "ddpo", "b2_no_schedule", "b2_no_branching", "b2_start",
           "b2_start_pairs", "b2_dpo", "d3po")
# the toy models a study can train: b2trl.toy.model_path(kind), and the page its report writes
MODELS = {"sd": "study.md", "sd3": "study_flow.md"}

# ------------------------------------------------------------------------------------------------ settings
# Everything that defines the study and its methods. A method's configuration is resolved as
#   shared  ->  its base method's block (if it names one)  ->  its own block,
# so `--set b2.train_learning_rate=...` also changes the ablations built on b2 (unless they set that key), while
# `--set shared.<key>=...` changes B² and DDPO alike. Keys are fields of `B2DiffuRLConfig` (b2*) or `trl.DDPOConfig`
# (ddpo); a key may drop the `train_` / `sample_` prefix when that is unambiguous (`b2.learning_rate`).
# `interval_schedule` holds `IntervalSchedule` fields; `initial_length: "T"` means `sample_num_steps`.
SETTINGS = {
    "study": {
        "model": "sd",  # which shipped toy model: "sd" (SD1.x, DDIM) or "sd3" (flow matching, SDE sampler)
        "budget_images": 1920,  # sampled images per (method, seed): 30 stages of 64
        "eval_every_images": 640,  # held-out evaluation every this many sampled images (and at 0)
        "seeds": [0, 1, 2],  # training seeds
        "eval_seeds": [0, 1, 2],  # evaluation noise seeds: fixed, independent of the training seed
        "eval_num_prompts": None,  # None: all 45 held-out prompts; n: n of them, spread over the list
    },
    # B² and DDPO alike: the sampler, the PPO update and the optimiser
    "shared": {
        "sample_num_steps": 20,
        "sample_eta": 1.0,
        "sample_guidance_scale": 5.0,
        "train_learning_rate": 1e-3,
        "train_clip_range": 0.1,
        "train_adv_clip_max": 5.0,
        "train_max_grad_norm": 1.0,
        "train_batch_size": 8,
        "train_gradient_accumulation_steps": 1,
        "train_num_inner_epochs": 2,
        "mixed_precision": "no",
    },
    # B² at 16 prompts x 4 branches = 64 images per stage (the other B² methods start from this block)
    "b2": {
        "trainer": "b2",
        "sample_batch_size": 16,
        "sample_num_batches_per_epoch": 1,
        "num_branches": 4,
        "selection_rule": "best_worst",
        "selection_threshold_best": 0.5,
        "selection_threshold_worst": -0.5,
        "history_stages": 4,
        # the interval grows from the last 14 of 20 steps to all of them over the whole budget (30 stages)
        "interval_schedule": {"initial_length": 14, "num_stages": 30},
    },
    # 64 images per stage, every timestep trained; per-prompt statistics once a prompt has 4 rewards (before
    # that TRL standardises by the batch), over its last 16 rewards
    "ddpo": {
        "trainer": "ddpo",
        "sample_batch_size": 64,
        "sample_num_batches_per_epoch": 1,
        "train_timestep_fraction": 1.0,
        "per_prompt_stat_tracking": True,
        "per_prompt_stat_tracking_buffer_size": 16,
        "per_prompt_stat_tracking_min_count": 4,
    },
    # B² with the "pairs" selection rule: a group's best and worst branches together, zero-sum advantages
    "b2_pairs": {"base": "b2", "selection_rule": "pairs"},
    # B² with more, smaller groups: 32 prompts x 2 branches (same 64 images per stage): `b2trl toy`'s
    # preset
    "b2_n2": {"base": "b2", "sample_batch_size": 32, "num_branches": 2},
    # B² without selection: branch groups and the schedule, every branch trained with its per-prompt z-score
    "b2_all": {"base": "b2", "selection_rule": "all"},
    # the whole trajectory from stage 0: branches fork at step 0 (they share only the initial noise)
    "b2_no_schedule": {"base": "b2", "interval_schedule": {"initial_length": "T"}},
    # one branch per prompt: plain trajectories, all trained with their per-prompt z-score (same interval
    # schedule, same history); 64 prompts x 1 branch keeps 64 images per stage
    "b2_no_branching": {"base": "b2", "num_branches": 1, "sample_batch_size": 64, "selection_rule": "all"},
    # the interval anchored at the start: the first 14 steps trained (branches fork at the initial noise), growing
    # forwards; the remaining steps finish each branch untrained
    "b2_start": {"base": "b2", "interval_schedule": {"anchor": "start"}},
    # both: the interval at the start, and a group's best and worst branch together with zero-sum advantages
    "b2_start_pairs": {"base": "b2", "interval_schedule": {"anchor": "start"}, "selection_rule": "pairs"},
    # B² with the DPO-style loss: each kept group's best and worst branch (z gap >= 1) as a (winner, loser) pair
    "b2_dpo": {"base": "b2", "loss_type": "dpo", "selection_rule": "pairs"},
    # D3PO expressed with this trainer: 32 pairs per stage sharing only the initial noise, the whole trajectory
    # trained from stage 0, every pair whose rewards differ (thresholds 0) trained with the DPO loss
    "d3po": {
        "base": "b2", "loss_type": "dpo", "selection_rule": "pairs", "num_branches": 2, "sample_batch_size": 32,
        "selection_threshold_best": 0.0, "selection_threshold_worst": 0.0, "interval_schedule": {"initial_length": "T"},
    },
}

# --quick: a CI-sized smoke run (2 stages of 4 images per method, 1 seed, 2 prompts x 1 seed evaluated)
QUICK = {
    "study": {"budget_images": 8, "eval_every_images": 4, "seeds": [0], "eval_seeds": [0], "eval_num_prompts": 2},
    "shared": {"train_batch_size": 2},
    "b2": {"sample_batch_size": 2, "num_branches": 2, "interval_schedule": {"num_stages": 2}},
    "ddpo": {"sample_batch_size": 4},
    "b2_n2": {"sample_batch_size": 2},
    "b2_no_branching": {"sample_batch_size": 4},
    "d3po": {"sample_batch_size": 2},
}

# --model sd3: the flow toy model's settings (`b2trl toy --pretrained_model toy-sd3`'s preset); DDPO has no flow sampler
FLOW = {"shared": {"train_learning_rate": 3e-4}, "b2": {"noise_level": 0.7}}

# the study decides these per run; settings may not
RESERVED = {"seed", "num_epochs", "save_freq", "log_with", "logdir", "project_kwargs", "resume_from", "run_name",
            "exp_name", "push_to_hub"}
STUDY_KEYS = set(SETTINGS["study"])
SCHEDULE_KEYS = {"initial_length", "num_stages", "milestones", "anchor"}


# ------------------------------------------------------------------------------------------------ settings logic


def merge(base: dict, override: dict) -> dict:
    """`base` updated by `override`, one level of nested dicts merged (for `interval_schedule`)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_fields(trainer: str) -> set[str]:
    if trainer == "b2":
        from b2trl import B2DiffuRLConfig as cls
    else:
        from trl import DDPOConfig as cls
    return {f.name for f in dataclasses.fields(cls)}


def canonical_key(block: str, key: str) -> str:
    """The settings key that `key` names in `block` (fields may drop a `train_`/`sample_` prefix)."""
    if block == "study":
        allowed = STUDY_KEYS
    else:
        trainer = "ddpo" if block in ("ddpo", "shared") else "b2"
        allowed = (config_fields(trainer) - RESERVED) | {"base", "trainer"}
    if key in allowed:
        return key
    expanded = [prefix + key for prefix in ("train_", "sample_") if prefix + key in allowed]
    if len(expanded) == 1:
        return expanded[0]
    hint = difflib.get_close_matches(key, sorted(allowed), n=1)
    raise SystemExit(
        f"error: unknown setting {block}.{key}" + (f"; did you mean {block}.{hint[0]}?" if hint else "")
        + (" (set by the study itself)" if key in RESERVED else "")
    )


def apply_override(settings: dict, path: str, value) -> None:
    """Set `settings[block][key]` (or `[block][interval_schedule][field]`) from a dotted `path`."""
    parts = path.split(".")
    if len(parts) < 2 or parts[0] not in settings:
        raise SystemExit(f"error: --set {path}: expected BLOCK.KEY with BLOCK one of {', '.join(settings)}")
    block, key, rest = parts[0], canonical_key(parts[0], parts[1]), parts[2:]
    if not rest:
        settings[block][key] = value
    elif key == "interval_schedule" and len(rest) == 1 and rest[0] in SCHEDULE_KEYS:
        settings[block].setdefault(key, {})[rest[0]] = value
    else:
        raise SystemExit(f"error: --set {path}: only interval_schedule has sub-keys ({', '.join(SCHEDULE_KEYS)})")


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_settings(quick: bool, settings_json: str | None, sets: list[str], model: str = "sd") -> dict:
    """SETTINGS, then FLOW (for the flow toy model), then QUICK (with `quick`), then a JSON override, then each
    `--set`, in that order."""
    settings = copy.deepcopy(SETTINGS)
    settings["study"]["model"] = model
    if model == "sd3":
        settings = {block: merge(values, FLOW.get(block, {})) for block, values in settings.items()}
    if quick:
        settings = {block: merge(values, QUICK.get(block, {})) for block, values in settings.items()}
    if settings_json:
        text = Path(settings_json).read_text() if os.path.isfile(settings_json) else settings_json
        override = json.loads(text)
        for block, values in override.items():
            if block not in settings or not isinstance(values, dict):
                raise SystemExit(f"error: --settings_json: expected {{BLOCK: {{KEY: VALUE}}}} with BLOCK one of "
                                 f"{', '.join(settings)}; got {block!r}")
            for key, value in values.items():
                if key == "interval_schedule" and isinstance(value, dict):
                    for field, field_value in value.items():
                        apply_override(settings, f"{block}.{key}.{field}", field_value)
                else:
                    apply_override(settings, f"{block}.{key}", value)
    for item in sets:
        path, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected BLOCK.KEY=VALUE")
        apply_override(settings, path.strip(), parse_value(value.strip()))
    return settings


def resolve_method(settings: dict, method: str) -> dict:
    """The full configuration of `method`: shared -> base method -> own block; `trainer` says which class."""
    own = settings[method]
    chain = [own]
    while "base" in chain[-1]:
        chain.append(settings[chain[-1]["base"]])
    resolved = copy.deepcopy(settings["shared"])
    for block in reversed(chain):
        resolved = merge(resolved, {k: v for k, v in block.items() if k != "base"})
    if "trainer" not in resolved:
        raise SystemExit(f"error: method {method} names no trainer (set trainer: b2 or ddpo, or a base)")
    schedule = resolved.get("interval_schedule")
    if isinstance(schedule, dict) and schedule.get("initial_length") == "T":
        resolved["interval_schedule"] = {**schedule, "initial_length": resolved["sample_num_steps"]}
    return resolved


def check_budget(study: dict, resolved: dict) -> None:
    """Every method must hit the same evaluation points: each one's images per stage divides both numbers."""
    budget, every = study["budget_images"], study["eval_every_images"]
    if budget < 1 or every < 1:
        raise SystemExit(f"error: budget_images ({budget}) and eval_every_images ({every}) must be positive")
    problems = []
    for method, config in resolved.items():
        per_stage = images_per_stage(config)
        if budget % per_stage or every % per_stage:
            problems.append(f"{method} samples {per_stage} images per stage")
    if problems:
        raise SystemExit(
            f"error: budget_images ({budget}) and eval_every_images ({every}) must be multiples of every method's "
            f"images per stage: " + "; ".join(problems)
        )


def validate_configs(resolved: dict) -> None:
    """Build every method's config once, so that a bad value stops the study before any run trains."""
    from trl import DDPOConfig

    for method, values in resolved.items():
        values = {k: v for k, v in copy.deepcopy(values).items() if k != "trainer"}
        try:
            b2_config(values) if resolved[method]["trainer"] == "b2" else DDPOConfig(**values)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"error: settings of {method}: {err}") from err


def fingerprint(method_settings: dict, study: dict, seed: int) -> str:
    """What decides a run's result; a finished run is reused only if this matches."""
    decisive = {k: v for k, v in study.items() if k != "seeds"}
    text = json.dumps({"settings": method_settings, "study": decisive, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ driver


def lock_holder(lock: Path) -> str | None:
    """Who holds a run's lock file: None if no one does, or if the process that wrote it has ended."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return f"an unreadable {lock.name}"  # being written this instant, or damaged: delete it if no run is going
    if holder.get("host") != socket.gethostname():
        return f"process {holder.get('pid')} on {holder.get('host')} (delete {lock.name} if it no longer runs)"
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return f"process {holder['pid']}"


def claim_run(lock: Path) -> str | None:
    """Take a run's lock; if another live process holds it, say which (and take nothing)."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_holder(lock)
            if holder is not None:
                return holder
            lock.unlink(missing_ok=True)  # its process has ended without removing it
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        return None
    return lock_holder(lock) or f"a process that keeps taking {lock.name}"


def code_version() -> str:
    """The repository's commit, marked if the working tree has changes (`unknown` outside a git checkout)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes" if dirty else "")


def command_line(argv: list[str]) -> str:
    """The invocation, with paths inside the repository written relative to it."""
    root = str(REPO) + os.sep
    return "python benchmarks/toy_study.py " + shlex.join(a.replace(root, "") for a in argv)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd", choices=sorted(MODELS),
                   help="the toy model: sd (SD1.x, DDIM; report docs/study.md) or sd3 (flow matching; report "
                   "docs/study_flow.md)")
    p.add_argument("--output_dir", default=None,
                   help="where runs/ go (default outputs/toy_study[_flow], or outputs/toy_study_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run; its report goes to --output_dir")
    p.add_argument("--report", action="store_true", help="only aggregate the finished runs into the report")
    p.add_argument("--report_dir", default=None,
                   help="where study.md and img/ go (default docs/; --output_dir for quick runs and for runs whose "
                   "settings differ from the study's: --set, --settings_json, --budget_images, --eval_every_images)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: study.seeds)")
    p.add_argument("--budget_images", type=int, default=None, help="shortcut for --set study.budget_images=N")
    p.add_argument("--eval_every_images", type=int, default=None, help="shortcut for study.eval_every_images")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                   help="override one setting (VALUE is JSON, else a string); repeatable")
    p.add_argument("--settings_json", default=None,
                   help='JSON object (or a file holding one) of overrides, e.g. \'{"b2": {"num_branches": 8}}\'')
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models run best on 1)")
    p.add_argument("--show_settings", action="store_true", help="print the resolved settings and exit")
    return p.parse_args(argv)


def default_report_dir(args, out: Path) -> Path:
    """docs/ for the study as it is defined; the output folder for a quick run or one with changed settings, so
    that an experiment does not overwrite the documented study's page."""
    changed = args.sets or args.settings_json or args.budget_images is not None or args.eval_every_images is not None
    return out if args.quick or changed else REPO / "docs"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    settings = load_settings(args.quick, args.settings_json, args.sets, args.model)
    for key in ("seeds", "budget_images", "eval_every_images"):
        if getattr(args, key) is not None:
            settings["study"][key] = getattr(args, key)
    study = settings["study"]
    default_out = "outputs/toy_study" + ("_flow" if args.model == "sd3" else "") + ("_quick" if args.quick else "")
    out = Path(args.output_dir or default_out)
    report_dir = Path(args.report_dir) if args.report_dir else default_report_dir(args, out)
    if args.quick and report.inside(report_dir, REPO / "docs"):
        raise SystemExit("error: a --quick run never writes its report into docs/")

    methods = list(args.methods)
    if args.model == "sd3" and "ddpo" in methods:
        if args.methods != list(METHODS):
            raise SystemExit("error: ddpo (TRL's DDPOTrainer) samples with DDIM only; drop it for --model sd3")
        methods.remove("ddpo")  # the default list: every method this model can run
    resolved = {m: resolve_method(settings, m) for m in methods}
    check_budget(study, resolved)
    if args.show_settings:
        print(json.dumps({"study": study, **resolved}, indent=1))
        return None

    def log(message):
        print(f"[toy_study] {message}", flush=True)

    if not args.report:
        import torch

        validate_configs(resolved)
        torch.set_num_threads(args.threads)
        os.environ.setdefault("TQDM_DISABLE", "1")
        runs = out / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        machine, code = common.machine_description(shared_cpu=True), code_version()

        def train_or_skip(method: str, seed: int, name: str, key: str):
            """One (method, seed) run, its lock held; None if a finished record with these settings exists."""
            final, partial = runs / f"{name}.json", runs / f"{name}.partial.json"
            if final.exists():
                previous = json.loads(final.read_text())
                if previous.get("status") == "done" and previous.get("fingerprint") == key:
                    log(f"skip {name}: finished ({final.relative_to(out)})")
                    return None
                log(f"{name}: settings changed since {final.name} was written; training it again "
                    f"(old result kept as {final.name}.stale)")
                os.replace(final, runs / f"{name}.json.stale")
            if partial.exists():
                log(f"{name}: an earlier attempt stopped part-way; starting it again")
            log(f"train {name}: {study['budget_images']} images, {images_per_stage(resolved[method])} per stage")
            meta = {"fingerprint": key, "command": command_line(argv), "machine": machine, "quick": args.quick,
                    "code": code}
            paths = {"partial": partial, "work": str(out / "work" / name)}
            record = run_one(method, seed, resolved[method], study, paths, meta, log)
            gc.collect()  # the run's pipeline and trainer
            report.write_json(final, record)
            partial.unlink(missing_ok=True)
            return record

        for seed in study["seeds"]:  # seeds outermost: a partial study already compares every method
            for method in methods:
                name = f"{method}_seed{seed}"
                key = fingerprint(resolved[method], study, seed)
                lock = runs / f"{name}.lock"
                holder = claim_run(lock)  # before looking at the run's files: another process may be finishing it
                if holder is not None:
                    log(f"skip {name}: {holder} is training it ({lock.relative_to(out)})")
                    continue
                try:
                    record = train_or_skip(method, seed, name, key)
                finally:
                    lock.unlink(missing_ok=True)
                if record is None:
                    continue
                log(f"done {name}: held-out alignment {record['final']['overall']:.3f}, "
                    f"train {record['wall']['train_seconds']:.0f} s, total {record['wall']['total_seconds']:.0f} s")

    written = report.write_report(out / "runs", report_dir, command_line(argv), allow_quick=args.quick
                                  or not report.inside(report_dir, REPO / "docs"), method_order=METHODS,
                                  page=MODELS[args.model])
    log(f"report: {written}")
    return written


if __name__ == "__main__":
    main()
