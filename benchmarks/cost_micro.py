"""The cost benchmark's speed-option micro-benchmarks (`cost.py --optimisations`), on the B² trainer's UNet.

Each option is measured against its baseline in the same process, the variants taking turns:

- `stacking`: several interval steps of a training micro-batch in one UNet forward/backward
  (`train_timesteps_per_forward`), against one step per call, with the gradients compared;
- `sdpa`: diffusers' default attention processor against the classic bmm-softmax one;
- `channels_last`: the channels-last memory layout against the contiguous one;
- `compile`: in-place `torch.compile` against eager (only when named: compiling takes minutes).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import torch
from cost_measure import build_b2_trainer

OPTIMISATIONS = ("stacking", "sdpa", "channels_last", "compile")


def _median_times(variants: dict, repeats: int, cuda: bool) -> dict:
    """
    Median seconds per call of each variant. A variant is a callable or ``(setup, call, teardown)``; only the call
    is timed. The variants take turns, so a slow spell of a shared machine hits all of them.
    """
    variants = {k: v if isinstance(v, tuple) else (None, v, None) for k, v in variants.items()}
    times = {name: [] for name in variants}

    def run(setup, call, teardown):
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
        run(*variant)  # warm-up
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(run(*variant))
    return {name: statistics.median(values) for name, values in times.items()}


def run_optimisations(args) -> dict:
    """Micro-benchmarks on the B² trainer's UNet; every ratio compares two variants measured in this process."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as logdir:
        trainer = build_b2_trainer(args, logdir)
    pipeline, family, unet = trainer.sd_pipeline, trainer.family, trainer.denoiser
    device, dtype = trainer.accelerator.device, unet.dtype
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    tb, length = args.train_batch_size, args.interval
    results = {"attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()})}

    # sampling: one no-grad guided call over one batch of prompts, as the branch rollout makes it
    sample_conditioning = trainer.encode(["a prompt"] * args.prompts)
    shape = family.latent_shape(pipeline, args.prompts, trainer.image_size)
    latents = torch.randn(shape, generator=generator).to(device, dtype)
    t_sample = torch.full((args.prompts,), int(pipeline.scheduler.config.num_train_timesteps // 2), device=device)

    def sample_call():
        unet.eval()
        with torch.no_grad(), trainer.autocast():
            family.predict(unet, latents, t_sample, sample_conditioning, args.guidance_scale)

    # training: a micro-batch of tb samples x L interval steps, PPO loss through the trainer's own loss
    steps = trainer.sampler.timesteps(pipeline.scheduler, args.num_steps, device)[args.num_steps - length :]
    latent_shape = family.latent_shape(pipeline, tb, trainer.image_size)[1:]
    x = torch.randn(tb, length, *latent_shape, generator=generator).to(device, dtype)
    x_next = (x.float() + 0.1 * torch.randn(x.shape, generator=generator).to(device)).to(dtype)
    t_train = steps.unsqueeze(0).repeat(tb, 1)
    conditioning = trainer.encode(["a prompt"] * tb)
    advantages = torch.randn(tb, generator=generator).to(device)

    def log_prob(j: int) -> torch.Tensor:
        return trainer.transition_log_prob(x[:, j], t_train[:, j], x_next[:, j], conditioning).detach()

    unet.train()
    old = torch.stack([log_prob(j) for j in range(length)], dim=1)
    params = [p for p in unet.parameters() if p.requires_grad]

    def train_micro_batch(k: int):
        """One micro-batch's L interval steps, k stacked per UNet call; the same gradient for every k."""
        unet.train()
        for start in range(0, length, k):
            span = slice(start, min(start + k, length))
            n = span.stop - span.start
            # rows sample-major (each sample's n steps in a row), as flatten(0, 1) orders the steps below
            loss, _, _ = trainer.calculate_loss(
                x[:, span].flatten(0, 1), t_train[:, span].flatten(0, 1), x_next[:, span].flatten(0, 1),
                old[:, span].flatten(0, 1), advantages.repeat_interleave(n), conditioning.repeat_interleave(n),
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
        from b2trl.accelerator import compile_unet

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
