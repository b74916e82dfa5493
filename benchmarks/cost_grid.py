"""Cost of a B²-DiffuRL stage per sampled image, relative to a TRL DDPO epoch, across branches N and interval L.

For each number of branches N and each interval length L of the schedule, one B² stage (`cost.py`'s
measurement: same model, LoRA, reward, sampler and micro-batch as DDPO) at the same number of sampled images as
one DDPO epoch. DDPO's epoch does not depend on N or L (every image, every step), so it is measured once per N,
just before that N's B² stages, and each ratio uses it: every ratio comes from the same run.

The reward defaults to `random` (seeded scores that never tie, as a continuous reward such as CLIPScore
behaves): with the toy alignment reward most groups tie and B² trains almost nothing, which flatters it.

"Whole schedule" is the cost of the reference schedule `IntervalSchedule(initial_length=L0, num_stages=100)`
over T steps: the mean of the measured per-L ratios, each weighted by the number of stages the schedule spends at
that L (needs every L from L0 to T measured).

    python benchmarks/cost_grid.py --out cost_grid.json                      # N in {2, 5, 8}, L in 14..20
    python benchmarks/cost_grid.py --branches 5 --intervals 14 20 --images 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import cost  # noqa: E402
from cost_measure import measure_method  # noqa: E402


def schedule_weights(intervals: list[int], num_steps: int, initial_length: int, num_stages: int = 100) -> dict:
    """How many of the reference schedule's stages run at each L (None if some L of the schedule is missing)."""
    from b2trl import IntervalSchedule

    lengths = IntervalSchedule(initial_length=initial_length, num_stages=num_stages).lengths(num_steps)
    counts = {L: lengths.count(L) for L in sorted(set(lengths))}
    return counts if set(counts) <= set(intervals) else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", type=int, nargs="+", default=[2, 5, 8], help="values of N")
    parser.add_argument("--intervals", type=int, nargs="+", default=list(range(14, 21)), help="values of L")
    parser.add_argument("--images", type=int, default=40, help="sampled images per stage (a multiple of every N)")
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--reward", default="random", choices=["random", "toy_alignment", "brightness"])
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--timesteps-per-forward", type=int, default=None,
                        help="B²'s train_timesteps_per_forward (default: the config's default)")
    parser.add_argument("--ddpo-sample-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", default="", help="more cost.py arguments, e.g. '--sd15-random --tiny-width'")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    for n in args.branches:
        if args.images % n:
            parser.error(f"--images {args.images} is not a multiple of N = {n}")

    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # dtype-cast notices, not results
    try:
        return _grid(args)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _grid(args) -> dict:
    def cost_args(n: int, interval: int):
        argv = ["--in-process", "--num-steps", str(args.num_steps), "--interval", str(interval),
                "--prompts", str(args.images // n), "--branches", str(n), "--reward", args.reward,
                "--train-batch-size", str(args.train_batch_size), "--threads", str(args.threads),
                "--ddpo-sample-batch-size", str(args.ddpo_sample_batch_size), *args.extra.split()]
        if args.timesteps_per_forward is not None:
            argv += ["--timesteps-per-forward", str(args.timesteps_per_forward)]
        return cost.parse_args(argv)

    started = time.time()
    cells, ddpo = [], {}
    for n in args.branches:
        print(f"N = {n}: DDPO epoch of {args.images} images ...", flush=True)
        ddpo[n] = measure_method("ddpo", cost_args(n, args.intervals[0]))
        for interval in args.intervals:
            b2 = measure_method("b2", cost_args(n, interval))
            cell = {
                "branches": n, "interval": interval, "images": b2["images"], "samples_kept": b2["samples_kept"],
                "transitions_trained": b2["transitions_trained"],
                "b2_seconds": b2["seconds"], "ddpo_seconds": ddpo[n]["seconds"],
                "cost_per_image_ratio": b2["seconds"]["total"] / ddpo[n]["seconds"]["total"],
                "sampling_ratio": b2["seconds"]["sampling"] / ddpo[n]["seconds"]["sampling"],
                "transitions_per_s_ratio": b2["transitions_per_s"] / ddpo[n]["transitions_per_s"]
                if b2["transitions_per_s"] else None,
                "unet_rows_ratio": (b2["unet_rows"]["sampling"] + b2["unet_rows"]["training"])
                / (ddpo[n]["unet_rows"]["sampling"] + ddpo[n]["unet_rows"]["training"]),
            }
            cells.append(cell)
            print(f"  N {n} L {interval}: kept {cell['samples_kept']}, cost per image "
                  f"{cell['cost_per_image_ratio']:.3f} of DDPO's, training "
                  f"{cell['transitions_per_s_ratio'] or 0:.2f}x DDPO's transitions/s", flush=True)

    weights = schedule_weights(args.intervals, args.num_steps, min(args.intervals))
    schedule = {}
    for n in args.branches:
        row = {c["interval"]: c for c in cells if c["branches"] == n}
        if weights:
            total = sum(weights.values())
            schedule[n] = {
                "cost_per_image_ratio": sum(row[L]["cost_per_image_ratio"] * w for L, w in weights.items()) / total,
                "transitions_per_s_ratio": sum(row[L]["transitions_per_s_ratio"] * w for L, w in weights.items())
                / total,
            }

    print()
    header = "| N | prompts × N | " + " | ".join(f"L = {L}" for L in args.intervals)
    header += " | whole schedule |" if schedule else " |"
    print(header)
    print("|" + "---|" * (2 + len(args.intervals) + bool(schedule)))
    for n in args.branches:
        row = {c["interval"]: c for c in cells if c["branches"] == n}
        line = f"| {n} | {args.images // n} × {n} | " + " | ".join(
            f"{row[L]['cost_per_image_ratio']:.2f}" for L in args.intervals)
        if schedule:
            line += f" | **{schedule[n]['cost_per_image_ratio']:.2f}** |"
        print(line + ("" if schedule else " |"))
    print("\nB² training transitions/s ÷ DDPO's:")
    for n in args.branches:
        row = {c["interval"]: c for c in cells if c["branches"] == n}
        print(f"  N {n}: " + ", ".join(f"L {L} {row[L]['transitions_per_s_ratio']:.2f}" for L in args.intervals))
    result = {
        "settings": vars(args), "machine": common.machine_description(shared_cpu=True), "cells": cells,
        "ddpo": ddpo, "schedule_weights": weights, "whole_schedule": schedule, "seconds": time.time() - started,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
