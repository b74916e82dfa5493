"""Cost of one B²-DiffuRL stage next to one TRL DDPO epoch, at an equal number of sampled images.

Both methods run on the same model (same weights, same LoRA: rank 4 on the attention projections), the same
reward, DDIM with eta 1.0 and classifier-free guidance, the same training micro-batch and inner epochs:

- B²-DiffuRL: one stage of `b2trl.B2DiffuRLTrainer`, `--prompts` prompts x `--branches` branches per sampling
  batch, interval length `--interval` (branch point T - L); training on the kept samples' interval steps.
- DDPO: one epoch of the real `trl.DDPOTrainer` (trl 0.23.1) with `trl.DefaultDDPOStableDiffusionPipeline`,
  `--prompts` prompts per sampling batch and `--branches` times as many batches (so the image counts match),
  training on every image's T steps.

Per method it reports UNet rows (a forward pre-hook counts the batch rows of every UNet call, split into
sampling and training), VAE decode rows, wall time of sampling, reward, training and the rest of the step,
peak memory (CUDA: `torch.cuda.max_memory_allocated`; CPU: peak resident set size, sampled with psutil every
5 ms while the step runs), images/s and trained transitions/s (image x timestep), and the B²/DDPO ratios. Each
method runs in a fresh Python process (`--in-process` to keep one), so peak memory is its own.

`--optimisations` adds micro-benchmarks on the B² trainer's UNet, each variant against its baseline in the
same process: `stacking` several interval steps of a training micro-batch into one UNet forward/backward
(`train_timesteps_per_forward`), `sdpa` vs the classic attention processor, `channels_last` memory layout,
and (only when named) `compile`, in-place `torch.compile`.

Usage:

    python benchmarks/cost.py --out cost.json                      # CPU, the shipped toy model
    python benchmarks/cost.py --optimisations --out cost.json       # ... plus the micro-benchmarks
    python benchmarks/cost.py --sd15-random --methods b2 ddpo plain --out cost.json
        # GPU: SD1.5-shaped pipeline with random weights, 512 px, fp16 (see benchmarks/gpu_check.sh)
    python benchmarks/cost.py --methods --optimisations compile      # torch.compile alone (minutes)
    python benchmarks/cost.py --sd15-random --tiny-width --resolution 64 --num-steps 4 --interval 2
        # CPU smoke test of the GPU path

Numbers measured on a shared CPU are noisy: compare ratios measured in one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter

import torch

from b2trl.prompts import ANIMAL_ACTIVITY_PROMPTS

# Figures measured on one NVIDIA H100 80GB (SD1.5 shape, random weights, 512 px, 20 DDIM steps, eta 1.0,
# guidance 5.0, fp16, batch 8, LoRA r4), and what b2trl should reach on the same card.
REFERENCE_H100 = {
    "plain_images_per_s": 6.04,
    "ddpo_sampling_images_per_s": 4.25,
    "ddpo_training_transitions_per_s": 24.2,
    "ddpo_epoch_16_images_s": 17.0,
    "peak_memory_gb_plain": 6.5,
    "peak_memory_gb_ddpo_epoch": 11.6,
}
TARGETS_H100 = {
    "b2_sampling_images_per_s": 8.5,
    "b2_training_transitions_per_s": 72.0,
    "stage_cost_per_image_vs_ddpo": 1 / 3,
}
METHODS = ("b2", "ddpo", "plain")
OPTIMISATIONS = ("stacking", "sdpa", "channels_last", "compile")


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--sd15-random", action="store_true",
                       help="SD1.5-shaped pipeline built from configs with random weights (default: the toy model)")
    model.add_argument("--tiny-width", action="store_true",
                       help="with --sd15-random: narrow channels and a small text encoder, for a CPU smoke test")
    model.add_argument("--resolution", type=int, default=512, help="image side with --sd15-random (multiple of 8)")
    run = parser.add_argument_group("run")
    run.add_argument("--methods", nargs="*", choices=METHODS, default=["b2", "ddpo"],
                     help="what to measure; 'plain' is diffusers' StableDiffusionPipeline at --plain-batch-size")
    run.add_argument("--num-steps", type=int, default=20, help="DDIM steps T")
    run.add_argument("--interval", type=int, default=14, help="B² interval length L (branch point T - L)")
    run.add_argument("--prompts", type=int, default=8, help="prompts per sampling batch (both methods)")
    run.add_argument("--branches", type=int, default=5, help="B² branches per prompt")
    run.add_argument("--batches", type=int, default=1, help="B² sampling batches per stage")
    run.add_argument("--ddpo-sample-batch-size", type=int, default=None,
                     help="DDPO prompts per sampling batch (default --prompts; it runs branches x more batches)")
    run.add_argument("--plain-batch-size", type=int, default=8)
    run.add_argument("--train-batch-size", type=int, default=4, help="training micro-batch (both methods)")
    run.add_argument("--inner-epochs", type=int, default=1, help="training passes over the samples (both methods)")
    run.add_argument("--timesteps-per-forward", type=int, default=1,
                     help="B²'s train_timesteps_per_forward: interval steps stacked into one training UNet call")
    run.add_argument("--guidance-scale", type=float, default=5.0)
    run.add_argument("--reward", choices=["auto", "toy_alignment", "brightness", "random"], default="auto",
                     help="auto: toy_alignment on the toy model, random (seeded scores) with --sd15-random")
    run.add_argument("--repeats", type=int, default=1,
                     help="stages/epochs run per method; the last one is reported (earlier ones warm up)")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    run.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                     help="auto: fp16 on CUDA, no on CPU")
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
    if args.sd15_random and args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision == "auto":
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    if args.optimisations == []:
        args.optimisations = list(OPTIMISATIONS[:3])
    if args.reward == "auto":
        args.reward = "random" if args.sd15_random else "toy_alignment"
    if args.ddpo_sample_batch_size is None:
        args.ddpo_sample_batch_size = args.prompts
    images = args.prompts * args.branches * args.batches
    if images % args.ddpo_sample_batch_size:
        parser.error(f"{images} images are not a whole number of DDPO batches of {args.ddpo_sample_batch_size}")
    return args


# ---------------------------------------------------------------------------------------------- models


def build_sd15_random(resolution: int = 512, tiny_width: bool = False, seed: int = 0):
    """
    A `StableDiffusionPipeline` with Stable Diffusion 1.5's architecture and random weights (no download).

    `tiny_width` keeps the layout (4 UNet levels, 4 VAE levels, CLIP text encoder) with narrow channels, so the
    same code path runs in seconds on a CPU.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from b2trl.testing import write_char_tokenizer

    torch.manual_seed(seed)
    text_dim, max_length = (64, 16) if tiny_width else (768, 77)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        **(dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1) if tiny_width else {}),
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64) if tiny_width else (128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1 if tiny_width else 2,
        latent_channels=4,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text_dim,
            intermediate_size=4 * text_dim,
            num_hidden_layers=2 if tiny_width else 12,
            num_attention_heads=4 if tiny_width else 12,
            max_position_embeddings=max_length,
            hidden_act="quick_gelu",
            # ids of the offline character tokenizer's special tokens
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        write_char_tokenizer(folder, max_length)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ddpo_pipeline(args):
    """The model both trainers start from, as TRL's `DefaultDDPOStableDiffusionPipeline` with LoRA."""
    from b2trl.pipeline import load_pipeline, wrap_pipeline

    if args.sd15_random:
        with torch.device(args.device):  # initialising a billion random weights is seconds faster on a GPU
            pipeline = build_sd15_random(args.resolution, args.tiny_width, args.seed)
        return wrap_pipeline(pipeline, use_lora=True)
    from b2trl.toy import model_path

    return load_pipeline(model_path(), use_lora=True)


def make_reward(args):
    if args.reward == "toy_alignment":
        from b2trl.toy import alignment_reward

        return alignment_reward
    if args.reward == "brightness":
        return lambda images, prompts, metadata: (torch.nan_to_num(images.float()).mean(dim=(1, 2, 3)), {})
    # seeded scores that ignore the images: a random-weight model's images carry no signal, and B²'s
    # selection (hence its training cost) needs rewards that differ within a group
    generator = torch.Generator().manual_seed(args.seed)
    return lambda images, prompts, metadata: (torch.rand(images.shape[0], generator=generator), {})


def make_prompt_fn(args):
    if args.sd15_random:
        prompts = list(ANIMAL_ACTIVITY_PROMPTS)
    else:
        from b2trl.toy import train_prompts

        prompts = train_prompts()
    rng = random.Random(args.seed)
    return lambda: (rng.choice(prompts), {})


def build_b2_trainer(args, logdir):
    from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer, IntervalSchedule

    config = B2DiffuRLConfig(
        num_epochs=args.repeats,
        sample_num_steps=args.num_steps,
        sample_batch_size=args.prompts,
        sample_num_batches_per_epoch=args.batches,
        num_branches=args.branches,
        sample_guidance_scale=args.guidance_scale,
        train_batch_size=args.train_batch_size,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=args.inner_epochs,
        train_timesteps_per_forward=args.timesteps_per_forward,
        interval_schedule=IntervalSchedule(initial_length=args.interval, milestones=[]),  # L stays fixed
        mixed_precision=args.mixed_precision,
        save_freq=0,
        logdir=logdir,
        seed=args.seed,
    )
    return B2DiffuRLTrainer(config, make_reward(args), make_prompt_fn(args), ddpo_pipeline(args))


def build_ddpo_trainer(args, logdir):
    from trl import DDPOConfig, DDPOTrainer

    from b2trl.pipeline import ensure_accelerate_state

    images = args.prompts * args.branches * args.batches
    config = DDPOConfig(
        num_epochs=args.repeats,
        sample_num_steps=args.num_steps,
        sample_eta=1.0,
        sample_guidance_scale=args.guidance_scale,
        sample_batch_size=args.ddpo_sample_batch_size,
        sample_num_batches_per_epoch=images // args.ddpo_sample_batch_size,
        train_batch_size=args.train_batch_size,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=args.inner_epochs,
        train_timestep_fraction=1.0,
        mixed_precision=args.mixed_precision,
        save_freq=10**9,
        logdir=logdir,
        seed=args.seed,
    )
    ensure_accelerate_state()  # TRL 0.23.1 logs before creating it
    pipeline = ddpo_pipeline(args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DDPOTrainer is deprecated")
        trainer = DDPOTrainer(config, make_reward(args), make_prompt_fn(args), pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return trainer


# ---------------------------------------------------------------------------------------------- measuring


class CostMeter:
    """
    Counts UNet and VAE-decoder rows and measures wall time and peak memory, per named phase.

    Phases nest (a whole step, and sampling/reward/training inside it); rows are charged to the innermost.
    """

    def __init__(self, unet, vae, device: str):
        self.cuda = device == "cuda"
        self.stack: list[str] = []
        self.unet_rows, self.unet_calls, self.vae_rows = Counter(), Counter(), Counter()
        self.seconds, self.peak = Counter(), {}
        self._handles = [
            unet.register_forward_pre_hook(self._count(self.unet_rows, self.unet_calls), with_kwargs=True),
            vae.decoder.register_forward_pre_hook(self._count(self.vae_rows, Counter()), with_kwargs=True),
        ]
        self._stop = threading.Event()
        self._sampler = None
        if not self.cuda:
            import psutil

            self._process = psutil.Process()
            self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
            self._sampler.start()

    def _count(self, rows, calls):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            phase = self.stack[-1] if self.stack else "outside"
            rows[phase] += int(sample.shape[0])
            calls[phase] += 1

        return hook

    def _memory(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else self._process.memory_info().rss

    def _sample_rss(self):
        while not self._stop.wait(0.005):
            self._note(self._process.memory_info().rss)

    def _note(self, value: int):
        for name in list(self.stack):
            self.peak[name] = max(self.peak.get(name, 0), value)

    def reset(self):
        for counter in (self.unet_rows, self.unet_calls, self.vae_rows, self.seconds):
            counter.clear()
        self.peak.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            self._note(torch.cuda.max_memory_allocated())  # what the enclosing phases reached so far
            torch.cuda.reset_peak_memory_stats()
        self.stack.append(name)
        self._note(self._memory())
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self._note(self._memory())
            self.stack.pop()

    def instrument(self, obj, methods: dict):
        """Charge every call of `obj.<attribute>` to a phase: ``{attribute: phase}``."""
        for attribute, name in methods.items():
            original = getattr(obj, attribute)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                with self.phase(_name):
                    return _original(*args, **kwargs)

            setattr(obj, attribute, wrapped)

    def close(self):
        self._stop.set()
        for handle in self._handles:
            handle.remove()


def warm_up(pipeline, embed, sampling_rows, training_rows, autocast):
    """First calls allocate memory and pick kernels; make them before anything is timed (weights unchanged)."""
    unet = pipeline.unet
    size = unet.config.sample_size
    device, dtype = embed.device, unet.dtype

    def inputs(rows):
        latents = torch.randn(rows, unet.config.in_channels, size, size, device=device, dtype=dtype)
        return latents, torch.full((rows,), 500, device=device), embed.expand(rows, -1, -1)

    with torch.no_grad(), autocast():
        for rows in sampling_rows:
            unet(*inputs(rows))
        pipeline.vae.decode(inputs(1)[0].to(pipeline.vae.dtype)).sample
    if training_rows:
        was_training = unet.training
        unet.train()
        with autocast():
            unet(*inputs(training_rows)).sample.float().mean().backward()
        unet.zero_grad(set_to_none=True)
        unet.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_method(method: str, args) -> dict:
    """Run one B² stage or one DDPO epoch (or plain sampling) and return its counts, times and memory."""
    torch.manual_seed(args.seed)
    if method == "plain":
        return measure_plain(args)
    with tempfile.TemporaryDirectory() as logdir:
        if method == "b2":
            trainer = build_b2_trainer(args, logdir)
            phases = {"_generate_samples": "sampling", "compute_rewards": "reward", "_train_stage": "training"}
            b = args.num_steps - args.interval
            sampling_rows = [2 * args.prompts] * (b > 0) + [2 * args.prompts * args.branches]
        else:
            trainer = build_ddpo_trainer(args, logdir)
            phases = {"_generate_samples": "sampling", "compute_rewards": "reward",
                      "_train_batched_samples": "training"}
            sampling_rows = [2 * args.ddpo_sample_batch_size]
        pipeline = trainer.sd_pipeline
        warm_up(pipeline, trainer.neg_prompt_embed, sampling_rows, 2 * args.train_batch_size, trainer.autocast)
        meter = CostMeter(pipeline.unet, pipeline.vae, args.device)
        meter.instrument(trainer, phases)
        global_step = 0
        try:
            for epoch in range(args.repeats):
                meter.reset()
                with meter.phase("step"):
                    global_step = trainer.step(epoch, global_step)
        finally:
            meter.close()
        result = summarise_meter(meter, method, args)
        images = args.prompts * args.branches * args.batches
        if method == "b2":
            stats = trainer.last_stage_stats
            result.update(
                samples_kept=stats["samples_kept"],
                groups_kept=stats["groups_kept"],
                interval_length=stats["interval_length"],
                branch_point=stats["branch_point"],
                transitions_trained=stats["samples_kept"] * stats["interval_length"] * args.inner_epochs,
                reward_mean=stats["reward_mean"],
            )
        else:
            result.update(
                interval_length=trainer.num_train_timesteps,
                transitions_trained=images * trainer.num_train_timesteps * args.inner_epochs,
            )
        result["images"] = images
        result["optimizer_steps"] = global_step
    return derive_rates(result)


def measure_plain(args) -> dict:
    """diffusers' own `StableDiffusionPipeline.__call__` (no log-probs), for a same-run anchor."""
    pipeline = ddpo_pipeline(args)
    sd = pipeline.sd_pipeline
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    sd.to(args.device, dtype=dtype)
    sd.set_progress_bar_config(disable=True)
    batch = args.plain_batch_size
    images = args.prompts * args.branches * args.batches
    prompts = [ANIMAL_ACTIVITY_PROMPTS[i % len(ANIMAL_ACTIVITY_PROMPTS)] for i in range(batch)]
    call = dict(num_inference_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=1.0, output_type="pt")
    with torch.no_grad():
        embeds, negative = sd.encode_prompt(prompts, args.device, 1, True)
    warm_up(pipeline, negative[:1], [2 * batch], None, contextlib.nullcontext)
    meter = CostMeter(sd.unet, sd.vae, args.device)
    try:
        with meter.phase("step"), meter.phase("sampling"), torch.no_grad():
            for _ in range(-(-images // batch)):
                sd(prompt_embeds=embeds, negative_prompt_embeds=negative, **call)
    finally:
        meter.close()
    result = summarise_meter(meter, "plain", args)
    result.update(images=-(-images // batch) * batch, transitions_trained=0)
    return derive_rates(result)


def summarise_meter(meter: CostMeter, method: str, args) -> dict:
    phases = ("sampling", "reward", "training")
    seconds = {p: meter.seconds.get(p, 0.0) for p in phases}
    seconds["other"] = max(0.0, meter.seconds["step"] - sum(seconds.values()))
    seconds["total"] = meter.seconds["step"]
    memory_kind = "cuda max_memory_allocated" if meter.cuda else "cpu peak RSS (psutil, sampled every 5 ms)"
    return {
        "method": method,
        "unet_rows": {p: meter.unet_rows.get(p, 0) for p in phases + ("step", "outside")},
        "unet_calls": {p: meter.unet_calls.get(p, 0) for p in phases + ("step", "outside")},
        "vae_decode_rows": sum(meter.vae_rows.values()),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "peak_memory_bytes": {p: meter.peak.get(p) for p in ("step", "sampling", "training")},
        "memory_kind": memory_kind,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def derive_rates(result: dict) -> dict:
    seconds = result["seconds"]
    result["images_per_s"] = result["images"] / seconds["sampling"] if seconds["sampling"] else None
    trained = result["transitions_trained"]
    result["transitions_per_s"] = trained / seconds["training"] if trained and seconds["training"] else None
    result["seconds_per_image"] = seconds["total"] / result["images"]
    return result


def expected_unet_rows(args) -> dict:
    """UNet rows the two methods must run, from the settings alone (CFG doubles every row)."""
    images = args.prompts * args.branches * args.batches
    prefix = args.num_steps - args.interval
    return {
        "b2_sampling": 2 * args.batches * (args.prompts * prefix + args.prompts * args.branches * args.interval),
        "ddpo_sampling": 2 * images * args.num_steps,
        "ddpo_training": 2 * images * args.num_steps * args.inner_epochs,
        # B²'s training rows depend on how many samples the selection kept: 2 * kept * L * inner epochs
    }


# ---------------------------------------------------------------------------------------------- optimisations


def _median_times(variants: dict, repeats: int, cuda: bool) -> dict:
    """
    Median seconds per call of each variant. A variant is a callable or ``(setup, call, teardown)``; only the call
    is timed. The variants take turns, so a slow spell of a shared machine hits all of them.
    """
    variants = {k: v if isinstance(v, tuple) else (None, v, None) for k, v in variants.items()}
    times = {name: [] for name in variants}

    def run(setup, call, teardown, timed):
        if setup:
            setup()
        try:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start
        finally:
            if teardown:
                teardown()

    for variant in variants.values():
        run(*variant, timed=False)  # warm-up
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(run(*variant, timed=True))
    return {name: statistics.median(values) for name, values in times.items()}


def run_optimisations(args) -> dict:
    """Micro-benchmarks on the B² trainer's UNet; every ratio compares two variants measured in this process."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as logdir:
        trainer = build_b2_trainer(args, logdir)
    pipeline, unet = trainer.sd_pipeline, trainer.sd_pipeline.unet
    device, dtype = trainer.accelerator.device, unet.dtype
    size, channels = unet.config.sample_size, unet.config.in_channels
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    tb, length = args.train_batch_size, args.interval
    results = {"attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()})}

    # sampling: one no-grad CFG call over one batch of prompts
    rows = 2 * args.prompts
    latents = torch.randn(rows, channels, size, size, generator=generator).to(device, dtype)
    embed = trainer.neg_prompt_embed.expand(rows, -1, -1)
    t_sample = torch.full((rows,), int(pipeline.scheduler.config.num_train_timesteps // 2), device=device)

    def sample_call():
        unet.eval()
        with torch.no_grad(), trainer.autocast():
            unet(latents, t_sample, embed)

    # training: a micro-batch of tb samples x L interval steps, PPO loss through the trainer's own loss
    pipeline.scheduler.set_timesteps(args.num_steps, device=device)
    steps = pipeline.scheduler.timesteps[args.num_steps - length :]
    x = torch.randn(tb, length, channels, size, size, generator=generator).to(device, dtype)
    x_next = (x.float() + 0.1 * torch.randn(x.shape, generator=generator).to(device)).to(dtype)
    t_train = steps.unsqueeze(0).repeat(tb, 1)
    prompt_embeds = trainer._encode_prompts(["a prompt"] * tb).detach()
    negative = trainer.neg_prompt_embed.expand(tb, -1, -1)
    advantages = torch.randn(tb, generator=generator).to(device)

    def log_prob(j: int) -> torch.Tensor:
        cfg_embeds = torch.cat([negative, prompt_embeds])
        return trainer.transition_log_prob(x[:, j], t_train[:, j], x_next[:, j], cfg_embeds).detach()

    unet.train()
    old = torch.stack([log_prob(j) for j in range(length)], dim=1)
    params = [p for p in unet.parameters() if p.requires_grad]

    def train_micro_batch(k: int):
        """One micro-batch's L interval steps, k stacked per UNet call; the same gradient for every k."""
        unet.train()
        for start in range(0, length, k):
            span = slice(start, min(start + k, length))
            n = span.stop - span.start
            embeds = torch.cat([negative.repeat_interleave(n, 0), prompt_embeds.repeat_interleave(n, 0)])
            loss, _, _ = trainer.calculate_loss(
                x[:, span].flatten(0, 1), t_train[:, span].flatten(0, 1), x_next[:, span].flatten(0, 1),
                old[:, span].flatten(0, 1), advantages.repeat_interleave(n), embeds,
            )
            (loss * n / length).backward()

    def gradient(k: int) -> list:
        unet.zero_grad(set_to_none=True)
        train_micro_batch(k)
        grads = [p.grad.detach().float().clone() for p in params]
        unet.zero_grad(set_to_none=True)
        return grads

    def train_call(k: int):
        def call():
            train_micro_batch(k)
            unet.zero_grad(set_to_none=True)

        return call

    def relative_difference(a: list, b: list) -> float:
        scale = max(float(g.abs().max()) for g in a) or 1.0
        return max(float((g - h).abs().max()) for g, h in zip(a, b)) / scale

    def as_is_vs_switched(as_is: str, switched: str, switch, restore, speedup_of: str) -> dict:
        """Median sampling and training times of the UNet as it is and switched (restored after each call), and
        the speedup of the `speedup_of` setting over the other one."""
        times = _median_times(
            {f"{as_is}_sampling": sample_call, f"{switched}_sampling": (switch, sample_call, restore),
             f"{as_is}_training": train_call(1), f"{switched}_training": (switch, train_call(1), restore)},
            args.opt_repeats, cuda,
        )
        other = switched if speedup_of == as_is else as_is
        return {"seconds": times, **{f"speedup_{part}": times[f"{other}_{part}"] / times[f"{speedup_of}_{part}"]
                                     for part in ("sampling", "training")}}

    sections = args.optimisations
    if "stacking" in sections:
        grads, out_of_memory = {}, []
        for k in sorted({k for k in (1, 2, 4, length) if k <= length}):
            try:  # more steps per call means more activation memory; a GPU may not hold all of them
                grads[k] = gradient(k)
            except torch.cuda.OutOfMemoryError:
                unet.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                out_of_memory.append(k)
        stacking = _median_times({f"k={k}": train_call(k) for k in grads}, args.opt_repeats, cuda)
        results["stacking"] = {
            "train_batch_size": tb,
            "interval_length": length,
            "seconds_per_micro_batch": stacking,
            "transitions_per_s": {name: tb * length / s for name, s in stacking.items()},
            "speedup_vs_k1": {name: stacking["k=1"] / s for name, s in stacking.items()},
            "gradient_max_relative_difference_vs_k1": {
                f"k={k}": relative_difference(grads[1], g) for k, g in grads.items()
            },
            "out_of_memory": out_of_memory,
        }
    if "sdpa" in sections:  # diffusers' default processor vs the classic bmm-softmax one
        results["sdpa"] = as_is_vs_switched(
            "sdpa", "classic", lambda: unet.set_attn_processor(AttnProcessor()),
            lambda: unet.set_attn_processor(AttnProcessor2_0()), speedup_of="sdpa",
        )
    if "channels_last" in sections:
        results["channels_last"] = as_is_vs_switched(
            "contiguous", "channels_last", lambda: unet.to(memory_format=torch.channels_last),
            lambda: unet.to(memory_format=torch.contiguous_format), speedup_of="channels_last",
        )
    if "compile" in sections:  # last: compiling in place cannot be undone
        from b2trl.pipeline import compile_unet

        eager = _median_times({"sampling": sample_call, "training": train_call(1)}, args.opt_repeats, cuda)
        eager_log_prob = log_prob(0)
        compile_unet(unet, **json.loads(args.compile_kwargs))
        first = {}
        for name, call in (("sampling", sample_call), ("training", train_call(1))):
            start = time.perf_counter()
            call()
            first[name] = time.perf_counter() - start
        compiled = _median_times({"sampling": sample_call, "training": train_call(1)}, args.opt_repeats, cuda)
        results["compile"] = {
            "compile_kwargs": json.loads(args.compile_kwargs),
            "first_call_seconds": first,
            "seconds_eager": eager,
            "seconds_compiled": compiled,
            "speedup_sampling": eager["sampling"] / compiled["sampling"],
            "speedup_training": eager["training"] / compiled["training"],
            "log_prob_max_abs_difference": float((log_prob(0) - eager_log_prob).abs().max()),
        }
    return results


# ---------------------------------------------------------------------------------------------- report


def machine_description(device: str) -> dict:
    import diffusers
    import peft
    import transformers
    import trl

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratios(b2: dict, ddpo: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    out = {
        "unet_rows_sampling": ratio(b2["unet_rows"]["sampling"], ddpo["unet_rows"]["sampling"]),
        "unet_rows_training": ratio(b2["unet_rows"]["training"], ddpo["unet_rows"]["training"]),
        "seconds_sampling": ratio(b2["seconds"]["sampling"], ddpo["seconds"]["sampling"]),
        "seconds_training": ratio(b2["seconds"]["training"], ddpo["seconds"]["training"]),
        "seconds_total": ratio(b2["seconds"]["total"], ddpo["seconds"]["total"]),
        "images_per_s": ratio(b2["images_per_s"], ddpo["images_per_s"]),
        "transitions_per_s": ratio(b2["transitions_per_s"], ddpo["transitions_per_s"]),
        "peak_memory": ratio(b2["peak_memory_bytes"]["step"], ddpo["peak_memory_bytes"]["step"]),
    }
    total_rows = ratio(
        b2["unet_rows"]["sampling"] + b2["unet_rows"]["training"],
        ddpo["unet_rows"]["sampling"] + ddpo["unet_rows"]["training"],
    )
    out["unet_rows_total"] = total_rows
    return out


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def print_report(report: dict) -> None:
    machine = report["machine"]
    print(f"{machine['device']}: {machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads")
    if report["methods"]:
        print_methods(report)
    if "optimisations" in report:
        print_optimisations(report["optimisations"])
    if "reference_comparison" in report:
        print("\nAgainst the H100 reference figures:")
        for item in report["reference_comparison"]:
            print(f"  {item['what']:<48} measured {_fmt(item['measured'])}  reference {_fmt(item['reference'])}")


def print_methods(report: dict) -> None:
    methods = report["methods"]
    names = [m for m in METHODS if m in methods]
    header = {"b2": "B²-DiffuRL stage", "ddpo": "TRL DDPO epoch", "plain": "plain diffusers"}
    gib = 1 / 2**30
    rows = [
        ("images sampled", lambda r: r["images"]),
        ("UNet rows, sampling", lambda r: r["unet_rows"]["sampling"]),
        ("UNet rows, training", lambda r: r["unet_rows"]["training"]),
        ("VAE decode rows", lambda r: r["vae_decode_rows"]),
        ("transitions trained", lambda r: r["transitions_trained"]),
        ("seconds, sampling", lambda r: r["seconds"]["sampling"]),
        ("seconds, reward", lambda r: r["seconds"]["reward"]),
        ("seconds, training", lambda r: r["seconds"]["training"]),
        ("seconds, total step", lambda r: r["seconds"]["total"]),
        ("images/s (sampling)", lambda r: r["images_per_s"]),
        ("transitions/s (training)", lambda r: r["transitions_per_s"]),
        ("seconds per sampled image", lambda r: r["seconds_per_image"]),
        ("peak memory, step (GiB)", lambda r: (r["peak_memory_bytes"]["step"] or 0) * gib),
    ]
    ratio_keys = {
        "UNet rows, sampling": "unet_rows_sampling", "UNet rows, training": "unet_rows_training",
        "seconds, sampling": "seconds_sampling", "seconds, training": "seconds_training",
        "seconds, total step": "seconds_total", "images/s (sampling)": "images_per_s",
        "transitions/s (training)": "transitions_per_s", "seconds per sampled image": "seconds_total",
        "peak memory, step (GiB)": "peak_memory",
    }
    widths = [28] + [18] * len(names) + [10]
    line = "".join(h.ljust(w) for h, w in zip(["", *[header[n] for n in names], "B²/DDPO"], widths))
    print(line)
    print("-" * len(line))
    for label, get in rows:
        cells = [label] + [_fmt(get(methods[n])) for n in names]
        cells.append(_fmt(report.get("ratios", {}).get(ratio_keys.get(label))))
        print("".join(c.ljust(w) for c, w in zip(cells, widths)))
    print(f"(memory: {methods[names[0]]['memory_kind']})")
    if "b2" in methods:
        b2 = methods["b2"]
        print(f"B² kept {b2['samples_kept']} of {b2['images']} samples ({b2['groups_kept']} groups), "
              f"interval {b2['interval_length']} of {report['settings']['num_steps']} steps")
    for name, check in report.get("checks", {}).items():
        print(f"check {name}: measured {check['measured']}, expected {check['expected']} "
              f"-> {'ok' if check['ok'] else 'MISMATCH'}")


def print_optimisations(opt: dict) -> None:
    print(f"\nMicro-benchmarks (attention processors: {', '.join(opt['attention_processors'])}):")
    stack = opt.get("stacking", {})
    for name, speedup in stack.get("speedup_vs_k1", {}).items():
        print(f"  training, {name} interval steps per UNet call: {speedup:.2f}x transitions/s of k=1 "
              f"(gradient rel. diff {stack['gradient_max_relative_difference_vs_k1'][name]:.1e})")
    if stack.get("out_of_memory"):
        print(f"  training, k={stack['out_of_memory']} interval steps per UNet call: out of memory")
    for key, label in (("sdpa", "SDPA vs classic attention"), ("channels_last", "channels-last vs contiguous"),
                       ("compile", "torch.compile vs eager")):
        if key in opt:
            print(f"  {label}: sampling {opt[key]['speedup_sampling']:.2f}x, "
                  f"training {opt[key]['speedup_training']:.2f}x")
    if "compile" in opt:
        c = opt["compile"]
        first = c["first_call_seconds"]
        print(f"  compile first calls: sampling {first['sampling']:.0f} s, training {first['training']:.0f} s; "
              f"log-prob difference {c['log_prob_max_abs_difference']:.1e}")


def reference_comparison(report: dict) -> list:
    methods, out = report["methods"], []

    def add(what, measured, reference):
        out.append({"what": what, "measured": measured, "reference": reference})

    if "plain" in methods:
        add("plain diffusers images/s", methods["plain"]["images_per_s"], REFERENCE_H100["plain_images_per_s"])
        add("plain diffusers peak memory GiB", (methods["plain"]["peak_memory_bytes"]["step"] or 0) / 2**30,
            REFERENCE_H100["peak_memory_gb_plain"])
    if "ddpo" in methods:
        add("TRL DDPO sampling images/s", methods["ddpo"]["images_per_s"], REFERENCE_H100["ddpo_sampling_images_per_s"])
        add("TRL DDPO training transitions/s", methods["ddpo"]["transitions_per_s"],
            REFERENCE_H100["ddpo_training_transitions_per_s"])
        add("TRL DDPO epoch seconds per image", methods["ddpo"]["seconds_per_image"],
            REFERENCE_H100["ddpo_epoch_16_images_s"] / 16)
        add("TRL DDPO peak memory GiB", (methods["ddpo"]["peak_memory_bytes"]["step"] or 0) / 2**30,
            REFERENCE_H100["peak_memory_gb_ddpo_epoch"])
    if "b2" in methods:
        add("B² sampling images/s (target)", methods["b2"]["images_per_s"], TARGETS_H100["b2_sampling_images_per_s"])
        add("B² training transitions/s (target)", methods["b2"]["transitions_per_s"],
            TARGETS_H100["b2_training_transitions_per_s"])
    if "ratios" in report:
        add("B²/DDPO cost per sampled image (target, at most)", report["ratios"]["seconds_total"],
            TARGETS_H100["stage_cost_per_image_vs_ddpo"])
    return out


def build_report(args, methods: dict, optimisations=None) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "out")}
    report = {"settings": settings, "machine": machine_description(args.device), "methods": methods}
    expected = expected_unet_rows(args)
    checks = {}
    if "b2" in methods:
        checks["b2_sampling_rows"] = (methods["b2"]["unet_rows"]["sampling"], expected["b2_sampling"])
        b2 = methods["b2"]
        checks["b2_training_rows"] = (b2["unet_rows"]["training"], 2 * b2["transitions_trained"])
    if "ddpo" in methods:
        checks["ddpo_sampling_rows"] = (methods["ddpo"]["unet_rows"]["sampling"], expected["ddpo_sampling"])
        checks["ddpo_training_rows"] = (methods["ddpo"]["unet_rows"]["training"], expected["ddpo_training"])
    report["checks"] = {k: {"measured": m, "expected": e, "ok": m == e} for k, (m, e) in checks.items()}
    if "b2" in methods and "ddpo" in methods:
        report["ratios"] = ratios(methods["b2"], methods["ddpo"])
    if optimisations is not None:
        report["optimisations"] = optimisations
    if args.device == "cuda" and args.sd15_random and not args.tiny_width and args.resolution == 512:
        report["reference_comparison"] = reference_comparison(report)
    return report


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
