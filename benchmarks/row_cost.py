"""What a training row costs in forward rows: the factor behind `compute/denoiser_rows`.

A *row* is one sample through the denoiser at one step. Sampling and reference passes run rows forward only;
training runs each row forward and backward. `b2trl.compute.TRAINING_ROW_COST` states a training row in
forward-row equivalents; this benchmark measures it on the shipped toy models (the SD toy's UNet and the flow toy's
transformer, each with the trainer's LoRA adapter), at the toy study's training micro-batch (8 samples × 2 stacked
steps, CFG doubling the rows), against a no-grad forward of the same rows. The variants take turns, so a slow spell
of a shared machine hits both.

    python benchmarks/row_cost.py [--rows 32] [--repeats 15] [--threads 1] [--out benchmarks/results/row_cost_cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure(kind: str, rows: int, repeats: int) -> dict:
    import torch

    from b2trl.models import family_for_pipeline

    torch.manual_seed(0)
    pipeline = common.toy_pipeline(kind)
    family = family_for_pipeline(pipeline)
    denoiser = pipeline.denoiser
    family.add_lora(denoiser)
    pipe = pipeline.sd_pipeline
    size = family.image_size(pipe)
    with torch.no_grad():
        cond = family.encode_prompts(pipe, ["a red circle left of a blue square"] * rows, "cpu", size)
    latents = torch.randn(family.latent_shape(pipe, rows, size))
    timesteps = torch.full((rows,), 500.0 if kind == "sd3" else 500)
    if kind == "sd":
        timesteps = timesteps.long()

    def forward():
        with torch.no_grad():
            family.forward(denoiser, latents, timesteps, cond)

    def forward_backward():
        family.forward(denoiser, latents, timesteps, cond).float().pow(2).mean().backward()
        denoiser.zero_grad(set_to_none=True)

    denoiser.train()
    times = {"forward": [], "forward_backward": []}
    for fn in (forward, forward_backward):
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"model": kind, "rows": rows, "repeats": repeats,
            "forward_seconds": round(medians["forward"], 5),
            "forward_backward_seconds": round(medians["forward_backward"], 5),
            "ratio": round(medians["forward_backward"] / medians["forward"], 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="rows per call: 8 samples x 2 steps x CFG = 32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=["sd", "sd3"], choices=["sd", "sd3"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    from b2trl.compute import TRAINING_ROW_COST

    torch.set_num_threads(args.threads)
    results = [measure(kind, args.rows, args.repeats) for kind in args.models]
    print(f"{'model':6} {'rows':>5} {'forward s':>10} {'fwd+bwd s':>10} {'ratio':>6}"
          f"   (b2trl counts {TRAINING_ROW_COST})")
    for r in results:
        print(f"{r['model']:6} {r['rows']:>5} {r['forward_seconds']:>10.4f} {r['forward_backward_seconds']:>10.4f} "
              f"{r['ratio']:>6.2f}")
    report = {"machine": common.machine_description(shared_cpu=True), "threads": args.threads,
              "training_row_cost": TRAINING_ROW_COST, "results": results}
    if args.out:
        common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
