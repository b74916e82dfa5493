"""Cost of one B²-DiffuRL stage next to one TRL DDPO epoch, at an equal number of sampled images.

Both methods run on the same model (same weights, same LoRA: rank 4 on the attention projections), the same
reward, DDIM with eta 1.0 (SD3: the flow SDE sampler) and classifier-free guidance, the same training
micro-batch and inner epochs:

- B²-DiffuRL: one stage of `b2trl.B2DiffuRLTrainer`, `--prompts` prompts x `--branches` branches per sampling
  batch, interval length `--interval` (branch point T - L); training on the kept samples' interval steps.
- DDPO: one epoch of the real `trl.DDPOTrainer` (trl 0.23.1) with the same pipeline (b2trl's pipelines are
  `trl.DefaultDDPOStableDiffusionPipeline`s), `--prompts` prompts per sampling batch and `--branches` times as
  many batches (so the image counts match), training on every image's T steps.

Per method it reports denoiser rows (a forward pre-hook counts the batch rows of every call of the UNet, or of SD3's
transformer, split into sampling and training; the JSON keeps the key `unet_rows`), VAE decode rows, wall time of
sampling, reward, training (B²: its stage's own `time/*` statistics; DDPO: its methods timed from outside) and the
rest of the step, peak memory (CUDA: `torch.cuda.max_memory_allocated`; CPU: peak resident set size, sampled with
psutil every 5 ms while the step runs), images/s and trained transitions/s (image x timestep), and the B²/DDPO
ratios. Each method runs in a fresh Python process (`--in-process` to keep one), so peak memory is its own.

`--optimisations` adds micro-benchmarks on the B² trainer's UNet, each variant against its baseline in the
same process: `stacking` several interval steps of a training micro-batch into one UNet forward/backward
(`train_timesteps_per_forward`), `sdpa` vs the classic attention processor, `channels_last` memory layout,
and (only when named) `compile`, in-place `torch.compile`.

The work is split over sibling modules: `cost_measure.py` (the trainers and one measured step of each),
`cost_micro.py` (the micro-benchmarks), `cost_report.py` (ratios, checks and tables) and `common.py`.

Usage:

    python benchmarks/cost.py --out cost.json                      # CPU, the shipped toy model
    python benchmarks/cost.py --optimisations --out cost.json       # ... plus the micro-benchmarks
    python benchmarks/cost.py --sd15-random --methods b2 ddpo plain --out cost.json
        # GPU: SD1.5-shaped pipeline with random weights, 512 px, fp16 (see benchmarks/gpu_check.sh)
    python benchmarks/cost.py --methods --optimisations compile      # torch.compile alone (minutes)
    python benchmarks/cost.py --sd15-random --tiny-width --resolution 64 --num-steps 4 --interval 2
        # CPU smoke test of the GPU path
    python benchmarks/cost.py --sdxl-random --methods b2 plain --out cost_sdxl.json
        # GPU: SDXL-base-shaped pipeline with random weights, 1024 px (B² against plain diffusers SDXL sampling)
    python benchmarks/cost.py --sd3-random --methods b2 plain --out cost_sd3.json
        # GPU: SD3.5-Medium-shaped pipeline with random weights, 1024 px (B² against plain diffusers SD3 sampling;
        # --no-t5 builds it without the T5 encoder)
    python benchmarks/cost.py --flux-random --methods b2 plain --out cost_flux.json
        # GPU: FLUX.1-dev-shaped pipeline with random weights, 1024 px, bf16, guidance 3.5 (B² against plain
        # diffusers FLUX sampling; one denoiser row per image, no classifier-free guidance)
    python benchmarks/cost.py --qwenimage-random --methods b2 plain --mixed-precision bf16 --resolution 512 \
        --out cost_qwenimage.json
        # GPU: Qwen-Image-shaped pipeline with random weights (20.4 B transformer, 8.3 B text encoder, built in bf16;
        # B² with true CFG against plain diffusers QwenImagePipeline sampling)

Numbers measured on a shared CPU are noisy: compare ratios measured in one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# the sibling modules import as top-level ones, whether this file runs as a script or is loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_measure import METHODS, measure_method  # noqa: E402
from cost_micro import OPTIMISATIONS, run_optimisations  # noqa: E402
from cost_report import build_report, print_report  # noqa: E402

# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--sd15-random", action="store_true",
                       help="SD1.5-shaped pipeline built from configs with random weights (default: the toy model)")
    model.add_argument("--sdxl-random", action="store_true",
                       help="SDXL-base-shaped pipeline built from configs with random weights (B² and plain only: "
                       "TRL's DDPO pipeline is SD1.x only)")
    model.add_argument("--sd3-random", action="store_true",
                       help="SD3.5-Medium-shaped pipeline built from configs with random weights (B² and plain only: "
                       "TRL's DDPO pipeline is SD1.x only)")
    model.add_argument("--flux-random", action="store_true",
                       help="FLUX.1-dev-shaped pipeline built from configs with random weights (B² and plain only; "
                       "guidance-distilled: one denoiser row per image, bf16 and guidance 3.5 by default)")
    model.add_argument("--qwenimage-random", action="store_true",
                       help="Qwen-Image-shaped pipeline built from configs with random weights, in the run's precision "
                       "(B² and plain only)")
    model.add_argument("--no-t5", action="store_true",
                       help="with --sd3-random: build the pipeline without its T5 encoder (zeros in T5's place)")
    model.add_argument("--tiny-width", action="store_true",
                       help="with --sd15-random/--sdxl-random/--sd3-random/--flux-random/--qwenimage-random: narrow "
                       "channels and small text encoders, for a CPU smoke test")
    model.add_argument("--resolution", type=int, default=None,
                       help="image side with --sd15-random (default 512), --sdxl-random, --sd3-random, --flux-random "
                       "or --qwenimage-random (default 1024); a multiple of 8 (of 16 for the three flow models)")
    run = parser.add_argument_group("run")
    run.add_argument("--methods", nargs="*", choices=METHODS, default=["b2", "ddpo"],
                     help="what to measure; 'plain' is the model's own diffusers pipeline (StableDiffusionPipeline, "
                     "...XLPipeline, StableDiffusion3Pipeline, FluxPipeline or QwenImagePipeline) at "
                     "--plain-batch-size")
    run.add_argument("--num-steps", type=int, default=20, help="sampling steps T (DDIM, or SD3's flow steps)")
    run.add_argument("--interval", type=int, default=14, help="B² interval length L (branch point T - L)")
    run.add_argument("--prompts", type=int, default=8, help="prompts per sampling batch (both methods)")
    run.add_argument("--branches", type=int, default=5, help="B² branches per prompt")
    run.add_argument("--batches", type=int, default=1, help="B² sampling batches per stage")
    run.add_argument("--ddpo-sample-batch-size", type=int, default=None,
                     help="DDPO prompts per sampling batch (default --prompts; it runs branches x more batches)")
    run.add_argument("--plain-batch-size", type=int, default=8)
    run.add_argument("--train-batch-size", type=int, default=4, help="training micro-batch (both methods)")
    run.add_argument("--inner-epochs", type=int, default=1, help="training passes over the samples (both methods)")
    run.add_argument("--timesteps-per-forward", type=int, default=None,
                     help="B²'s train_timesteps_per_forward: interval steps stacked into one training UNet call "
                     "(default: the config's default)")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="B²'s gradient_checkpointing: recompute the denoiser's activations in the backward pass")
    run.add_argument("--guidance-scale", type=float, default=None,
                     help="classifier-free guidance scale (default 5.0), or FLUX.1-dev's embedded guidance (3.5)")
    run.add_argument("--reward", choices=["auto", "toy_alignment", "brightness", "random"], default="auto",
                     help="auto: toy_alignment on the toy model, random (seeded scores) with a random-weights model")
    run.add_argument("--repeats", type=int, default=1,
                     help="stages/epochs run per method; the last one is reported (earlier ones warm up)")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    run.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                     help="auto: fp16 on CUDA (bf16 with --flux-random: FLUX does not produce valid images in fp16), "
                     "no on CPU")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--in-process", action="store_true",
                     help="measure every method in this process (faster; CPU peak memory then carries over)")
    opt = parser.add_argument_group("optimisations")
    opt.add_argument("--optimisations", nargs="*", choices=OPTIMISATIONS, default=None,
                     help=f"also run these micro-benchmarks (no names: {' '.join(OPTIMISATIONS[:3])}); "
                     "'compile' builds torch.compile graphs, which takes minutes")
    opt.add_argument("--compile-kwargs", default="{}", help="torch.compile arguments as JSON, for 'compile'")
    opt.add_argument("--opt-repeats", type=int, default=5, help="timed repeats per micro-benchmark variant")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--worker", choices=METHODS + ("optimisations",), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.interval <= args.num_steps:
        parser.error(f"--interval must be in [1, --num-steps], got {args.interval}")
    randoms = (("--sd15-random", args.sd15_random), ("--sdxl-random", args.sdxl_random),
               ("--sd3-random", args.sd3_random), ("--flux-random", args.flux_random),
               ("--qwenimage-random", args.qwenimage_random))
    if sum(given for _, given in randoms) > 1:
        parser.error("give at most one of " + ", ".join(flag for flag, _ in randoms))
    for flag, given in randoms[1:]:
        if given and "ddpo" in (args.methods or []):
            parser.error(f"{flag} measures b2, b2_dpo and plain: TRL's DDPO pipeline loads SD1.x only "
                         "(pass e.g. --methods b2 plain)")
    if args.no_t5 and not args.sd3_random:
        parser.error("--no-t5 goes with --sd3-random")
    args.random_model = any(given for _, given in randoms)
    # classifier-free guidance doubles every denoiser row; FLUX.1-dev's guidance is an input of one row
    args.cfg_rows = 1 if args.flux_random else 2
    if args.guidance_scale is None:
        args.guidance_scale = 3.5 if args.flux_random else 5.0
    flow = args.sd3_random or args.flux_random or args.qwenimage_random
    if args.resolution is None:
        args.resolution = 1024 if args.sdxl_random or flow else 512
    if args.random_model and args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    if flow and args.resolution % 16:
        parser.error("--resolution must be a multiple of 16 with --sd3-random, --flux-random or --qwenimage-random "
                     "(8x VAE, then 2x2 patches)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision == "auto":
        args.mixed_precision = ("bf16" if args.flux_random else "fp16") if args.device == "cuda" else "no"
    if args.optimisations == []:
        args.optimisations = list(OPTIMISATIONS[:3])
    if args.reward == "auto":
        args.reward = "random" if args.random_model else "toy_alignment"
    if args.ddpo_sample_batch_size is None:
        args.ddpo_sample_batch_size = args.prompts
    images = args.prompts * args.branches * args.batches
    if images % args.ddpo_sample_batch_size:
        parser.error(f"{images} images are not a whole number of DDPO batches of {args.ddpo_sample_batch_size}")
    return args



# ---------------------------------------------------------------------------------------------- main


def _in_subprocess(job: str, argv: list) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", job, "--worker-out", path]
        subprocess.run(command, check=True)
        with open(path) as f:
            return json.load(f)


def run_job(job: str, args):
    return run_optimisations(args) if job == "optimisations" else measure_method(job, args)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # dtype-cast notices, not results
    try:
        return _run(args, argv)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _run(args, argv: list) -> dict:
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(run_job(args.worker, args), f)
        return {}
    jobs = list(dict.fromkeys(args.methods)) + (["optimisations"] if args.optimisations else [])
    results = {}
    for job in jobs:
        print(f"measuring {job} ...", flush=True)
        results[job] = run_job(job, args) if args.in_process else _in_subprocess(job, argv)
    optimisations = results.pop("optimisations", None)
    report = build_report(args, results, optimisations)
    print()
    print_report(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
