"""Do branch comparisons give an interval's steps a cleaner policy gradient per image? Measured on the toy world.

For each interval position and setup, draws several independent stages (fresh prompts and noise, same weights:
nothing is ever updated), computes each stage's policy gradient (the PPO loss gradient at ratio 1: minus the
advantage-weighted sum of the interval steps' log-probability gradients, on the kept samples) and reports how
well the gradients of different stages agree: their mean pairwise cosine similarity. Two gradients that each
were mostly signal point the same way (cosine near 1); pure noise gives cosines near 0. If a stage's gradient
sums `kept` images and the mean cosine is c, the noise-to-signal ratio of one image's gradient is about
kept (1 - c) / c, which is also the number of images a gradient needs for a cosine of 0.5.

Setups, all at the same number of images per stage (`--prompts_per_stage` P, `--num_branches` N):

- `b2`: B²'s groups, P prompts x N branches forking at the interval's first step, best/worst selection.
- `b2_all`: the same groups (the same samples, stage for stage), every branch trained.
- `independent`: P x N independent trajectories (one branch each), every one trained.
- `b2_pairs` (optional): the groups with the "pairs" selection rule.
- `independent_groups` (optional): P prompts drawn N times each, independent trajectories (no shared prefix):
  the per-prompt comparison of the groups without their branching.

Every setup z-scores a stage's rewards per prompt against that stage alone (`history_stages=0`), so stages
are independent. A sample with z = 0 (an `independent` prompt drawn only once in its stage, a group whose
rewards all tie) is kept but adds nothing; the JSON's `trained` counts the samples with a nonzero advantage.
Stage i of every setup uses seed `--seed` + i for its prompts and noise, so the setups see the same prompt
sequence, and `b2` and `b2_all` the very same samples. Every setup starts from the same LoRA initialisation.

Positions: an interval of `--interval_length` L of the T steps at the start ([0, L)), in the middle
([(T - L) // 2, (T - L) // 2 + L)) or at the end ([T - L, T), where B²'s schedule starts). Branches fork at
the interval's first step; the steps after it finish each branch unrecorded.

Statistics: n stages give n (n - 1) / 2 pairwise cosines, which are not independent (each stage is in n - 1
of them). The standard error of their mean is the delete-one-stage jackknife's:
SE = sqrt((n - 1) / n * sum_i (m_-i - m)^2), m_-i the mean cosine of the pairs without stage i. The report's
last line names the cells whose SE is above `--target_se`, with about how many stages would bring it there
(rerun just those with `--positions`/`--setups`: stage i is the same draw in every run).

With `--out`, the JSON is rewritten after every cell, and a rerun with the same measurement settings (model, T,
L, P, N, stages, seed) takes the cells already in it instead of measuring them again: a stopped run resumes, and
a run of other `--positions`/`--setups` adds its cells to the file's.

    python benchmarks/gradient_snr.py --stages 32 --out outputs/gradient_snr.json
    python benchmarks/gradient_snr.py --model sd3 --positions early late --setups b2 independent
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# the sibling modules import as top-level ones, whether this file runs as a script or is loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

POSITIONS = ("early", "middle", "late")
# setup -> (prompts per stage and branches per prompt, as factors of P and N; selection rule; prompt repeats)
SETUPS = {
    "b2": dict(prompts="P", branches="N", rule="best_worst"),
    "b2_all": dict(prompts="P", branches="N", rule="all"),
    "b2_pairs": dict(prompts="P", branches="N", rule="pairs"),
    "independent": dict(prompts="PN", branches="1", rule="all"),
    "independent_groups": dict(prompts="PN", branches="1", rule="all", repeat="N"),
}
DEFAULT_SETUPS = ("b2", "b2_all", "independent")


def interval(position: str, num_steps: int, length: int) -> tuple[int, int]:
    """The steps ``[start, end)`` of an interval of `length` steps at `position` of a `num_steps`-step
    trajectory."""
    if not 1 <= length <= num_steps:
        raise ValueError(f"interval length must be in [1, {num_steps}], got {length}.")
    start = {"early": 0, "middle": (num_steps - length) // 2, "late": num_steps - length}[position]
    return start, start + length


def setup_shape(setup: str, prompts_per_stage: int, num_branches: int) -> dict:
    """A setup's sampling batch: prompts per stage, branches per prompt, selection rule, prompt repeats."""
    spec = SETUPS[setup]
    factor = {"P": prompts_per_stage, "N": num_branches, "PN": prompts_per_stage * num_branches, "1": 1}
    return dict(prompts=factor[spec["prompts"]], branches=factor[spec["branches"]], rule=spec["rule"],
                repeat=factor[spec.get("repeat", "1")])


def repeated(prompt_fn, times: int):
    """A prompt function returning each of `prompt_fn`'s prompts `times` times in a row."""
    draws = (drawn for drawn in iter(prompt_fn, None) for _ in range(times))
    return lambda: next(draws)


class Stage(NamedTuple):
    gradient: Any  # torch.Tensor: the flattened gradient of the trainable parameters
    kept: int  # samples the selection kept
    trained: int  # kept samples with a nonzero advantage (the ones that contribute)
    reward_mean: float
    steps: tuple[int, int]  # the recorded steps [start, end), read from the samples' timesteps


def stage_gradient(trainer, branch_point: int, seed: int, interval_end: int | None = None, repeat: int = 1) -> Stage:
    """
    One stage's policy gradient at ratio 1, through the trainer's own named steps (sample, score, advantages):
    minus the advantage-weighted sum of the kept samples' log-probability gradients over the interval
    ``[branch_point, interval_end)`` (to the last step by default). The stage's prompts (each drawn `repeat`
    times in a row) and noise both follow `seed`.
    """
    import torch

    import b2trl.toy as toy
    from b2trl.models import Conditioning

    trainer.prompt_fn = repeated(common.seeded_prompts(toy.train_prompts(), seed), repeat)
    torch.manual_seed(seed)
    end = trainer.config.sample_num_steps if interval_end is None else interval_end
    stage = trainer.compute_advantages(trainer.score(trainer.sample_stage(seed, interval=(branch_point, end))))
    samples, keep, advantages, rewards = stage.transitions, stage.keep, stage.advantages, stage.rewards
    # kept samples with a zero advantage (a prompt drawn once, a group whose rewards all tie) add nothing: not run
    rows = torch.as_tensor(np.flatnonzero((keep & (advantages != 0)).reshape(-1)))
    weights = torch.as_tensor(advantages.reshape(-1)[rows.numpy()]).float()
    conditioning = Conditioning.from_rows(samples, trainer.negative_conditioning).index(rows)
    trainer.optimizer.zero_grad()
    if len(rows):
        for j in range(samples["timesteps"].shape[1]):
            log_prob = trainer.transition_log_prob(
                samples["latents"][rows, j], samples["timesteps"][rows, j], samples["next_latents"][rows, j],
                conditioning,
            )
            (-(weights * log_prob).sum()).backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().clone()
                      for p in trainer.trainable_params])
    trainer.optimizer.zero_grad()
    # which steps of the whole trajectory the samples recorded
    schedule = trainer.sampler.timesteps(trainer.sd_pipeline.scheduler, trainer.config.sample_num_steps,
                                         trainer.accelerator.device)
    recorded = [int((schedule.float() - float(t)).abs().argmin()) for t in samples["timesteps"][0]]
    return Stage(grad, int(keep.sum()), len(rows), float(np.nanmean(rewards)), (recorded[0], recorded[-1] + 1))


def make_trainer(prompts_per_stage: int, num_branches: int, rule: str, model: str = "sd", num_steps: int = 20,
                 lora_seed: int = 0):
    """A B² trainer on a shipped toy model (LoRA), one sampling batch per stage; `stage_gradient` sets its
    prompts. The LoRA adapter is initialised from `lora_seed`, so trainers built with the same seed start from
    the same weights. Writes nothing."""
    import torch

    import b2trl.toy as toy
    from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer, IntervalSchedule

    config = B2DiffuRLConfig(
        num_epochs=1,
        sample_num_steps=num_steps,
        sample_batch_size=prompts_per_stage,
        sample_num_batches_per_epoch=1,
        num_branches=num_branches,
        selection_rule=rule,
        # z-scores against this stage's rewards alone: stages stay independent, whatever was drawn before
        history_stages=0,
        # unused (the interval is chosen per stage), but validated against the number of steps
        interval_schedule=IntervalSchedule(initial_length=num_steps),
        mixed_precision="no",
        save_freq=0,
        log_with=None,
        project_kwargs={"project_dir": tempfile.mkdtemp(prefix="gradient_snr_")},
    )
    torch.manual_seed(lora_seed)
    pipeline = common.toy_pipeline(model)
    return B2DiffuRLTrainer(config, toy.alignment_reward, lambda: (toy.train_prompts()[0], {}), pipeline)


def jackknife(cosines, n: int) -> tuple[float, float]:
    """
    The mean of the pairwise cosines of `n` stages (in ``itertools.combinations(range(n), 2)`` order) and its
    delete-one-stage jackknife standard error; `n` must be at least 3.
    """
    if n < 3:
        raise ValueError(f"the jackknife needs at least 3 stages, got {n}.")
    pairs = list(itertools.combinations(range(n), 2))
    cosines = np.asarray(cosines, dtype=np.float64)
    if cosines.shape != (len(pairs),):
        raise ValueError(f"{n} stages have {len(pairs)} pairs, got {cosines.shape[0]} cosines.")
    involved = np.array([[i in pair for pair in pairs] for i in range(n)])  # (stage, pair)
    leave_one_out = np.array([cosines[~involved[i]].mean() for i in range(n)])
    se = np.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    return float(cosines.mean()), float(se)


def noise_to_signal(images: float, cosine: float) -> float | None:
    """The noise-to-signal ratio of one image's gradient, when gradients summing `images` images agree with
    mean cosine `cosine`: images (1 - c) / c (`None`, unbounded, when c <= 0)."""
    return float(images * (1 - cosine) / cosine) if cosine > 0 else None


def ratio_text(ratio) -> str:
    return "∞ (cosine <= 0)" if ratio is None else f"{ratio:.0f}"


def measure_cell(trainer, setup: dict, start: int, end: int, seeds) -> dict:
    """The stages of one (setup, position) cell, their pairwise cosines, mean and jackknife SE."""
    import torch

    t0 = time.time()
    stages = [stage_gradient(trainer, start, seed, end, repeat=setup["repeat"]) for seed in seeds]
    cosines = [float(torch.nn.functional.cosine_similarity(a.gradient, b.gradient, dim=0))
               for a, b in itertools.combinations(stages, 2)]
    mean, se = jackknife(cosines, len(stages))
    kept = float(np.mean([s.kept for s in stages]))
    return dict(
        steps=[start, end], recorded_steps=[list(s.steps) for s in stages], seeds=list(seeds),
        kept=[s.kept for s in stages], trained=[s.trained for s in stages],
        reward_mean=[s.reward_mean for s in stages], cosines=cosines, mean_cosine=mean, se=se,
        kept_mean=kept, noise_to_signal_per_image=noise_to_signal(kept, mean),
        noise_to_signal_per_trained_image=noise_to_signal(np.mean([s.trained for s in stages]), mean),
        seconds=time.time() - t0,
    )


# the arguments that decide a cell's numbers: a cell in an earlier --out file is reused only if these match
DECISIVE_ARGS = ("model", "num_steps", "interval_length", "prompts_per_stage", "num_branches", "stages", "seed")


def finished_cells(path: Path, args) -> dict:
    """The cells of an earlier run at `path` measured with the same decisive arguments, by (position, setup)."""
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"{path} is not valid JSON; measuring every cell again")
        return {}
    old_args = previous.get("args", {})
    changed = [k for k in DECISIVE_ARGS if old_args.get(k) != getattr(args, k)]
    if changed:
        stale = path.with_name(f"{path.stem}.stale{path.suffix}")
        path.replace(stale)
        print(f"{path} was measured with other settings ({', '.join(changed)}); measuring every cell again "
              f"(the earlier results are kept as {stale.name})")
        return {}
    return {(c["position"], c["setup"]): c for c in previous.get("cells", [])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(DEFAULT_SETUPS), choices=list(SETUPS))
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=list(POSITIONS))
    parser.add_argument("--interval_length", type=int, default=6, help="L: steps in the interval")
    parser.add_argument("--num_steps", type=int, default=20, help="T: denoising steps per trajectory")
    parser.add_argument("--prompts_per_stage", type=int, default=32, help="P: prompts per stage of the groups")
    parser.add_argument("--num_branches", type=int, default=4, help="N: branches per group")
    parser.add_argument("--stages", type=int, default=8, help="independent stages per (setup, position)")
    parser.add_argument("--seed", type=int, default=0, help="stage i uses seed SEED + i (every setup alike)")
    parser.add_argument("--model", default="sd", choices=["sd", "sd3"], help="toy model: sd (DDIM) or sd3 (flow)")
    parser.add_argument("--target_se", type=float, default=0.03, help="the standard error the report checks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.stages < 3:
        parser.error("--stages must be at least 3 (the jackknife needs them)")
    for position in args.positions:
        try:
            interval(position, args.num_steps, args.interval_length)
        except ValueError as err:
            parser.error(str(err))

    import torch

    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.stages)]
    shapes = {name: setup_shape(name, args.prompts_per_stage, args.num_branches) for name in args.setups}
    trainers = {}  # one per setup, built when first needed, reused for every position and stage (never updated)
    images = args.prompts_per_stage * args.num_branches
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_cells(out, args) if out else {}
    grid = set(itertools.product(args.positions, shapes))
    others = [c for key, c in done.items() if key not in grid]  # cells this run does not cover stay in the file
    result = dict(args=vars(args), machine=common.machine_description(shared_cpu=True), stages=args.stages,
                  cosine_pairs="itertools.combinations(range(stages), 2)", cells=[])
    cells = result["cells"]
    print(f"{args.stages} independent stages per cell, {images} images per stage, {args.model} toy model, "
          f"intervals of {args.interval_length} of {args.num_steps} steps")
    print("| position | steps | setup | images/stage | kept/stage | mean cosine ± SE | noise/signal per image |")
    print("|---|---|---|---|---|---|---|")
    for position in args.positions:
        start, end = interval(position, args.num_steps, args.interval_length)
        for name, shape in shapes.items():
            cell = done.get((position, name))
            if cell is None:
                if name not in trainers:
                    trainers[name] = make_trainer(shape["prompts"], shape["branches"], shape["rule"], args.model,
                                                  args.num_steps)
                cell = measure_cell(trainers[name], shape, start, end, seeds)
                cell = dict(position=position, setup=name, prompts_per_stage=shape["prompts"],
                            num_branches=shape["branches"], selection_rule=shape["rule"],
                            prompt_repeats=shape["repeat"], images_per_stage=shape["prompts"] * shape["branches"],
                            **cell)
            # the variance of a mean of pairwise statistics falls at least as fast as 1 / stages (Hoeffding), so
            # this many stages would bring the SE to the target: an upper estimate, as rough as the SE itself
            cell["stages_for_target_se"] = math.ceil(args.stages * (cell["se"] / args.target_se) ** 2)
            cells.append(cell)
            if out:
                common.write_json(out, dict(result, cells=cells + others))
            reused = f" (from {out.name})" if (position, name) in done else ""
            print(f"| {position} | [{start}, {end}) | {name} | {cell['images_per_stage']} | {cell['kept_mean']:.1f} | "
                  f"{cell['mean_cosine']:+.3f} ± {cell['se']:.3f} | {ratio_text(cell['noise_to_signal_per_image'])} |"
                  f"{reused}", flush=True)
    over = [f"{c['position']}/{c['setup']} (SE {c['se']:.3f}; ~{c['stages_for_target_se']} stages)"
            for c in cells if c["se"] > args.target_se]
    print(f"{args.stages} stages per cell. SE <= {args.target_se} in every cell: "
          + ("yes" if not over else "no; above it: " + ", ".join(over)))
    if others:
        print(f"{len(others)} other cells of {out.name} kept as they were: "
              + ", ".join(f"{c['position']}/{c['setup']}" for c in others))
    result["cells"] = cells + others
    return result


if __name__ == "__main__":
    main()
